"""The regime where the masking rate's noise is large: char-level pretraining on
data/tinyshakespeare.txt, scored by the val ELBO, the paper's arms under both protocols, with
intervals; then the loss's and the gradient's A, B, C at the end of training beside each arm's
outcome.

    python -m lab.reproduce_text              # 7 arms x 8 seeds, 3,000 steps: see docs/text.md
    python -m lab.reproduce_text --quick      # 5 arms x 2 seeds, 120 steps: a smoke test
    python -m lab.reproduce_text --seeds=10    # 2 more seeds: the cached runs are reused

On the sort tasks the loss's B (the masking rate's share of the variance) is too small to detect,
so P-POTS, which targets B, can only tie there. Text is the regime where B is large. Here, on 2
CPU cores:
  task         train.py --task=text on the shipped tinyshakespeare, char level, windows of 64
               characters, the held-out last 10 % as val; a 2 x 64 Transformer (4 heads), lr
               3e-3 cosine to 1e-4 after 100 warm-up steps, STEPS = 3,000 steps of 32 windows, from
               scratch (calibration, what was tried and why: docs/text.md);
  P-POTS       fitted once the model has left the unigram stage, at STEPS / 3, and refitted every
               STEPS / 6 (ppots_refit_every) so that its law follows the curve of E[l^2 | t] as the
               model learns; every fit's predicted second moment against uniform t is in the
               run's log and in variance.md;
  evaluation   the val ELBO in nats per char (sample.val_elbo: 100 fixed val batches of 32
               windows, the same for every arm, eval_batch_size, at a fixed stratified t-grid),
               with its own masking error, at STEPS / 4, 1/2, 3/4 (the curve) and the end (the
               comparisons); the ARM's is its val cross-entropy. An MDM's val ELBO bounds its
               NLL from above, so the MDM-ARM gap is an upper bound on the gap in likelihood;
  variance     every run logs the loss's and the gradient's A, B, C at its end (variance.py), and
               the variance of its training batch's mean over 128 batches (batch_var): the per-step
               training-loss variance that the primary pairs compare; report() measures each arm
               again on its seed-0 checkpoint, on the same x0s for every arm, with intervals.
Seeds: 8. The primary family is the three pairs (PRIMARY) x both claims, 6 tests under Holm, and a
paired sign-flip test on n seeds cannot go below p = 2^(1 - n): n = 8 is the smallest n at which
6 x 2^(1 - n) < 0.05, so that a verdict can pass at all (at 5 seeds every one reads "untestable").
Arms (B = 32 clean windows per step), by default: Standard; P-POTS; MIRROR and P-POTS+MIRROR (B/2
clean windows, two views: matched compute); Standard-2x (2B clean: the compute control of the
paper's protocol); P-POTS+MIRROR-paper (B clean, two views); the ARM on the same windows, a
reference (its comparisons with Standard are exploratory).

What a seed pairs: seed s fixes the init and the stream of training windows; the arms with 32
clean windows per step (Standard, P-POTS, P-POTS+MIRROR-paper, the ARM) see the same windows at
every step, the matched arms the first half of each, Standard-2x its own; t and masks come from
one seeded stream that the arms consume differently.
"""
import json
import math
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import load_checkpoint
from configurator import report_errors
from data import task_from_checkpoint
from lab import plots, record, study
from lab.stats import fmt_ci, fmt_diff, holm, paired_difference, spearman, verdict
from lab.variance_table import versus_baseline
from masking import clean_rows, mask_spec_from_config
from samplers import make_sampler, sampler_from_state
from variance import measure

METHODS = {
    "Standard": "",
    "P-POTS": "--t_sampler=ppots",
    "MIRROR": "--masking=mirror",
    "P-POTS+MIRROR": "--t_sampler=ppots --masking=mirror",
    "Standard-2x": "",  # + --batch_size = 2 x the study's batch (batch_multiple)
    "P-POTS+MIRROR-paper": "--t_sampler=ppots --masking=mirror --matched_compute=False",
    "ARM": "--model_type=arm",
}
PRIMARY = (("P-POTS", "Standard"), ("P-POTS+MIRROR", "Standard"),
           ("P-POTS+MIRROR-paper", "Standard-2x"))
CURVES = ("Standard", "P-POTS", "P-POTS+MIRROR", "Standard-2x", "P-POTS+MIRROR-paper", "ARM")
STEPS = 3000
TASK = ("--task=text --data_path=data/tinyshakespeare.txt --block_size=64 --batch_size=32 "
        "--n_layer=2 --n_head=4 --n_embd=64 --dropout=0 --learning_rate=3e-3 --min_lr=1e-4 "
        "--warmup_iters=100 --eval_iters={n} --eval_batch_size=32 --eval_at_start=False "
        "--variance_n_batches=128 --sample_length=0")
EVAL_BATCHES = 100
DEFAULTS = dict(methods=",".join(METHODS), seeds=8, out="results_text", device="",
                max_iters=STEPS, task_args=TASK.format(n=EVAL_BATCHES), train_args="", jobs=2,
                threads=1, quick=False)
QUICK = dict(seeds=2, max_iters=120, out="results_text_quick", task_args=TASK.format(n=4),
             methods="Standard,P-POTS,P-POTS+MIRROR,Standard-2x,P-POTS+MIRROR-paper")
END = dict(n_x0=64, n_t=16, n_masks=4, grad_n_x0=16, n_proj=4)  # report()'s draws per arm
END_SEED = 0  # their generator: the same x0s, rates and masks for every arm
NO_GAIN = 0.95  # a P-POTS fit whose predicted second moment is above this x uniform's predicts
# (almost) nothing to gain


def schedule(it):
    """Evaluated every ceil(it / 4) steps; variance logged at the start and the end; P-POTS fitted
    at it / 3 and refitted every it / 6 (3,000: fits at 1,000, 1,500, 2,000, 2,500)."""
    return [f"--eval_interval={-(-it // 4)}", f"--variance_interval={it}",
            f"--ppots_fit_iter={it // 3}", f"--ppots_refit_every={max(1, it // 6)}"]


def read_log(cfg, arm, seed):
    with open(os.path.join(study.run_dir(cfg, arm, seed), "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def end_variance(cfg, jobs):
    """Per MDM arm, on its seed-0 checkpoint at the end of training, with the sampler it trained
    with last and its masking: the draws of w l and of its gradient (variance.measure, the same
    x0s, rates and masks from END_SEED for every arm), and its clean rows per step."""
    draws, rows = {"loss": {}, "grad": {}}, {}
    for job in tqdm([j for j in jobs if j["seed"] == 0 and j["record"]["status"] == "ok"
                     and j["conf"]["model_type"] == "mdm"], desc="end-of-run variance"):
        conf, arm = job["conf"], job["method"]
        model, ckpt = load_checkpoint(os.path.join(study.run_dir(cfg, arm, 0), "ckpt.pt"))
        dataset = task_from_checkpoint(ckpt)
        sampler = sampler_from_state(ckpt["sampler"]) if conf["t_sampler"] == "ppots" \
            else make_sampler(conf["t_sampler"])
        spec = mask_spec_from_config(conf, dataset)
        for target, n_x0 in (("loss", END["n_x0"]), ("grad", END["grad_n_x0"])):
            draws[target][arm] = measure(
                model, dataset, sampler, spec, n_x0, END["n_t"], END["n_masks"], target=target,
                generator=torch.Generator().manual_seed(END_SEED), n_proj=END["n_proj"],
                keep_draws=True)["draws"]
        rows[arm] = clean_rows(conf["batch_size"], conf["masking"], conf["matched_compute"])
    return draws, rows


def variance_vs_outcome(cfg, summary, jobs):
    """The loss's and the gradient's A, B, C at the end of each arm's seed-0 run, with intervals,
    beside its val ELBO difference to Standard: markdown, and rows of JSON types."""
    draws, rows = end_variance(cfg, jobs)
    ci = {t: versus_baseline(d, rows, "Standard") for t, d in draws.items() if d}
    diffs = {c["method"]: c["diff"] for c in summary["comparisons"]
             if c["ref"] == "Standard" and c["iter"] == summary["iters"][-1] and c["diff"]}
    lines, out = [], []
    for target in ci:
        lines += ["", f"**{'The loss w l' if target == 'loss' else 'Its gradient'}**", "",
                  "| arm | clean rows | A | B | C | per-draw total | batch-mean variance | vs "
                  "Standard |", "|" + " --- |" * 8]
        for arm in draws[target]:
            ratio = ci[target].get((arm, "ratio"))
            lines.append("| " + " | ".join([arm, str(rows[arm])] + [
                fmt_ci(ci[target][arm, k]) for k in ("A", "B", "C", "total", "batch")] + [
                fmt_ci(ratio) if ratio else "—"]) + " |")
    for arm in draws.get("loss", {}):
        d = diffs.get(arm)
        out.append(dict(arm=arm, rows=rows[arm], **{f"{t}_{k}": ci[t][arm, k] for t in ci
                                                     for k in ("A", "B", "C", "batch")},
                        delta=d and dict(est=d["diff"], lo=d["lo"], hi=d["hi"], p=d["p"])))
    lines += ["", "| arm | grad batch-mean variance vs Standard | Δ val ELBO vs Standard "
                  "(nats/char) [95 % CI], p |", "| --- | --- | --- |"]
    for r in out:
        ratio = ci.get("grad", {}).get((r["arm"], "ratio"))
        lines.append(f"| {r['arm']} | {fmt_ci(ratio) if ratio else '—'} | "
                     f"{fmt_diff(diffs[r['arm']], 4) if r['arm'] in diffs else '—'} |")
    ranked = [r for r in out if r["delta"] and "grad_batch" in r]
    if len(ranked) >= 3:
        rho = spearman([r["grad_batch"]["est"] for r in ranked],
                       [r["delta"]["est"] for r in ranked])
        lines += ["", f"Spearman rank correlation over the {len(ranked)} MDM arms other than "
                      f"Standard, between the end-of-run batch-mean gradient variance and Δ val "
                      f"ELBO: {rho:+.2f} (descriptive, no interval; positive: less variance, "
                      f"lower ELBO)."]
    lines += ["", f"Measured on each arm's seed-0 checkpoint at the end of training, with the "
                  f"sampler it last trained with, over the same {END['n_x0']} (gradient: "
                  f"{END['grad_n_x0']}) training windows x {END['n_t']} rates x {END['n_masks']} "
                  f"masks for every arm (gradient: the trace from {END['n_proj']} random "
                  f"directions); [95 % CI]: bootstrap over the windows, paired across arms. "
                  f"Batch-mean variance: per-draw total / clean rows. Each arm's model is its own, "
                  f"so a difference mixes the estimator's variance with the model it reached."]
    return "\n".join(lines).lstrip("\n") + "\n", out


def batch_variance(jobs, alpha=0.05):
    """The per-step training-loss variance as each run measured it at its end (the logged
    batch_var), compared for the primary pairs: the paired mean of log(ours / ref) over seeds
    as a ratio with its 95 % CI and permutation p, Holm over the pairs; markdown lines."""
    var = {(j["method"], j["seed"]): j["record"].get("loss_batch_var") for j in jobs
           if j["record"]["status"] == "ok"}
    rows, tests = [], []
    for ours, ref in PRIMARY:
        seeds = sorted(s for (m, s), v in var.items() if m == ours and v and var.get((ref, s)))
        if len(seeds) >= 2:
            d = paired_difference([math.log(var[ours, s]) for s in seeds],
                                  [math.log(var[ref, s]) for s in seeds])
            rows.append((ours, ref, seeds, d))
            tests.append(d)
    for d, p in zip(tests, holm([d["p"] for d in tests])):
        d["p_holm"] = p
    lines = ["| ours | vs | seeds | batch-mean loss variance, ours / ref [95 % CI] | p | Holm p "
             "(of {}) | lower? |".format(len(tests)), "| --- | --- | --- | --- | --- | --- | --- |"]
    for ours, ref, seeds, d in rows:
        call = verdict(d["lo"], d["hi"], d["p_holm"], len(seeds), "lower", alpha, len(tests))
        lines.append(f"| {ours} | {ref} | {len(seeds)} | {math.exp(d['diff']):.3f} "
                     f"[{math.exp(d['lo']):.3f}, {math.exp(d['hi']):.3f}] | {d['p']:.2g} | "
                     f"{d['p_holm']:.2g} | {call} |")
    return lines + ["", "Each run's batch_var: the variance of a training batch's mean loss over "
                        "128 fresh batches at the end of its training (variance.measure, its own "
                        "model, sampler and masking); the ratio is exp of the paired mean of log "
                        "ratios over seeds, its CI the bootstrap's, p the paired sign-flip permutation "
                        "test's; Holm over the three primary pairs, a family of its own."]


def fits(cfg, jobs):
    """Every P-POTS fit of every run (its log's ppots records): markdown lines, per arm and fit
    iteration the predicted second moment E[(w l)^2] against uniform t's, over seeds."""
    lines = ["| arm | fit at iteration | predicted E[(w l)^2] / uniform's, mean [min, max] over "
             "seeds | the optimum's |", "| --- | --- | --- | --- |"]
    gains = {}
    for arm in cfg["methods"]:
        recs = [read_log(cfg, arm, j["seed"]) for j in jobs if j["method"] == arm
                and j["conf"]["t_sampler"] == "ppots" and j["record"]["status"] == "ok"]
        by_iter = {}
        for log in recs:
            for r in log:
                if "ppots" in r:
                    by_iter.setdefault(r["iter"], []).append((r["ppots"]["ratio"],
                                                              r["ppots"]["optimum"]))
        for it, vals in sorted(by_iter.items()):
            ratio, best = np.array(vals).T
            lines.append(f"| {arm} | {it} | {ratio.mean():.3f} [{ratio.min():.3f}, "
                         f"{ratio.max():.3f}] | {best.mean():.3f} |")
            gains.setdefault(arm, []).append(ratio.mean())
    for arm, ratios in gains.items():
        if min(ratios) > NO_GAIN:
            lines += ["", f"{arm}: every fit predicts a second moment above {NO_GAIN} x uniform's: "
                          f"a P-POTS that predicts no gain here, reported as such, not a method "
                          f"tested."]
    return lines


def report(cfg, summary, jobs):
    """variance.md (end-of-run A, B, C beside the outcome; the primary pairs' per-step loss
    variance; the P-POTS fits), variance.json, curves.json and curves.png (val ELBO against step
    and forward rows, mean and a band of ± 1 std over seeds, the arms of CURVES that ran)."""
    text, rows = variance_vs_outcome(cfg, summary, jobs)
    text += "\n## Per-step training-loss variance, primary pairs\n\n" + "\n".join(
        batch_variance(jobs)) + "\n\n## P-POTS's fits\n\n" + "\n".join(
        fits(cfg, jobs)) + "\n"
    with open(os.path.join(cfg["out"], "variance.md"), "w") as f:
        f.write("# End-of-run variance and outcome\n\n" + text)
    with open(os.path.join(cfg["out"], "variance.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(text)
    curves = dict(arms=record.curves(jobs, [a for a in CURVES if a in cfg["methods"]]),
                  note="the ARM: val cross-entropy")
    with open(os.path.join(cfg["out"], "curves.json"), "w") as f:
        json.dump(curves, f, indent=1)
    plots.plot_curves(curves, os.path.join(cfg["out"], "curves.png"),
                      ylabel="val ELBO (nats/char)", step_label="step", bounded=False)


TEXT = study.Study(
    title="Char-level text pretraining (tinyshakespeare), both protocols: val ELBO in nats/char "
          "({max_iters} steps, {flags})",
    methods=METHODS, defaults=DEFAULTS, quick=QUICK, schedule=schedule,
    batch_multiple={"Standard-2x": 2}, controls={"P-POTS+MIRROR-paper": "Standard-2x"},
    primary=PRIMARY, points=(1.0,), report=report, metric=record.VAL_ELBO,
    pairing="seed s fixes the init and the stream of training windows: the arms with 32 clean "
            "windows per step (Standard, P-POTS, P-POTS+MIRROR-paper, the ARM) see the same "
            "windows, the matched arms the first half of each, Standard-2x its own; t and masks "
            "come from one seeded stream that the arms consume differently.",
    notes="Rows and budget: reproduce_text.py's docstring. Lower is better. The ARM's value is its "
          "val cross-entropy, a reference (an MDM's val ELBO is an upper bound on its NLL). "
          "variance.md has every arm's end-of-run A, B, C with intervals, the per-step loss "
          "variance of the primary pairs and every P-POTS fit.")


def main(argv):
    """study.main on TEXT: the number of failed runs."""
    return study.main(TEXT, argv)


if __name__ == "__main__":
    report_errors()
    sys.exit(1 if main(sys.argv[1:]) else 0)
