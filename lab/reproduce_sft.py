"""The paper's regime at laptop scale: pretrain once, fine-tune (SFT) on a finite set for 5 epochs,
the paper's arms under both protocols, with intervals at the end of the schedule and half-way;
then the gradient variance of each arm at SFT step 0 beside its outcome.

    python -m lab.reproduce_sft              # 7 arms x 10 seeds, 313 steps: see docs/sft.md
    python -m lab.reproduce_sft --quick      # the 4 primary arms x 2 seeds, short: a smoke test
    python -m lab.reproduce_sft --methods=all --seeds=5   # every arm of METHODS, ARM included
    python -m lab.reproduce_sft --methods=Standard,MIRROR-paper --seeds=5 --jobs=2 --threads=1

The paper fine-tunes a pretrained LLaDA-8B-Instruct on GSM8K-sized sets for several epochs (lr 5e-5,
linear decay to 0, batch 32, clip 1.0), reports the end of that schedule, fits P-POTS once on the
pretrained model, and runs MIRROR's two views on the same x0 (2x forward rows, 3 seeds). Here, on 2
CPU cores:
  pretraining  train.py --task=mix (data.py: two-way sorts of 2-12 digits, additions of 1-6),
               fresh data, seed 0, one MDM and one ARM, cached in <out>/pretrain/{mdm,arm}
               (PRETRAIN);
  SFT          train.py --init_from=<pretrained MDM> --task=twosort --num_digits=12: 12 digits
               sorted ascending, then descending, 25 answer tokens, from a finite set of
               TRAIN_SIZE = 2,000 examples drawn once (the same for every seed and arm);
               STEPS = 313 steps of 32 clean rows = 5.0 epochs; lr 1e-3, linear decay to 0 at
               the last step, no warmup, clip 1.0; P-POTS fitted at SFT step 0
               (ppots_fit_iter=0) on the pretrained model;
  evaluation   held-out exact match (greedy) on the same EVAL_PROBLEMS = 1,024 problems, never
               in the set, at steps 79, 158 and 237 (1/4, 1/2, 3/4) and at 313, the end of the
               schedule (primary). The claims are compared at 1/2 (not lr-decayed: the rate is
               still half its peak) and at the end; 1/4 and 3/4 are points of the curve.
Arms (B = 32 clean rows per step), by default (ARMS): Standard; Standard-2x (2B clean rows: the
compute control of the paper's protocol); MIRROR-paper, pair-paper, P-POTS+MIRROR-paper (B clean
rows, 2B forward rows: the paper's protocol); P-POTS (unbiased, t on [0, 1]); P-POTS+MIRROR (B/2
clean rows, two views: matched compute). --methods=all adds MIRROR and pair at matched compute,
P-POTS-grid (the released code's t range, biased), Clipped, StraTS, ISAD (the first answer token)
and the ARM, fine-tuned alike. The pretrained ARM solves the task before SFT: its accuracy is a
reference, reported beside the study (report), never a row of the comparison unless asked for.

What a seed pairs. Every run of every seed starts from the same pretraining run (seed 0): there is
no init to pair, and every result here is conditional on that one pretrained model. Seed s fixes
the stream of training examples (train.py's data generator: the same epoch permutations of the
same 2,000 examples for every arm) and the t and mask draws (the global generator, which arms
consume differently). Only arms with the same clean rows per step see the same examples at every
step: Standard, P-POTS and the -paper arms (32). Standard-2x (64) takes two of those steps'
examples per step, so it covers 10 epochs in 313 steps, and the matched arms (16) half of one, 2.5
epochs: their batches are their own.

Calibration (what was tried, why 5 epochs at lr 1e-3) and timings: docs/sft.md.
"""
import json
import os
import shlex
import subprocess
import sys
import time

import torch
from tqdm import tqdm

from checkpoint import load_checkpoint
from configurator import report_errors
from data import task_from_checkpoint
from finetune import training_set
from masking import clean_rows, mask_spec_from_config
from sample import accuracy
from lab import plots, record, study
from lab.stats import fmt_ci, fmt_diff, spearman
from lab.variance_table import versus_baseline
from samplers import build_ppots, make_sampler, sampler_from_state
from variance import measure

MDM, ARM = "--init_from={out}/pretrain/mdm/ckpt.pt", "--init_from={out}/pretrain/arm/ckpt.pt"
METHODS = {
    "Standard": MDM,
    "Standard-2x": MDM,  # + --batch_size = 2 x the study's batch (batch_multiple)
    "MIRROR-paper": f"{MDM} --masking=mirror --matched_compute=False",
    "MIRROR": f"{MDM} --masking=mirror",
    "pair-paper": f"{MDM} --masking=pair --matched_compute=False",
    "pair": f"{MDM} --masking=pair",
    "P-POTS": f"{MDM} --t_sampler=ppots",
    "P-POTS-grid": f"{MDM} --t_sampler=ppots --ppots_support=grid",
    "P-POTS+MIRROR-paper": f"{MDM} --t_sampler=ppots --masking=mirror --matched_compute=False",
    "P-POTS+MIRROR": f"{MDM} --t_sampler=ppots --masking=mirror",
    "Clipped": f"{MDM} --t_sampler=clipped",
    "StraTS": f"{MDM} --t_sampler=stratified",
    "ISAD": f"{MDM} --isad_tokens=first --isad_delta=0.2",
    "ARM": f"{ARM} --model_type=arm",
}
PAPER = ("MIRROR-paper", "pair-paper", "P-POTS+MIRROR-paper")
ARMS = ("Standard", "Standard-2x", "MIRROR-paper", "pair-paper", "P-POTS", "P-POTS+MIRROR-paper",
        "P-POTS+MIRROR")  # the default arms; --methods=all runs every row of METHODS
CURVES = ("Standard", "Standard-2x", "P-POTS+MIRROR-paper", "P-POTS+MIRROR")  # primary arms
TRAIN_SIZE = 2000
STEPS = 313  # 313 x 32 / 2,000 = 5.0 epochs
EVAL_PROBLEMS = 1024  # every evaluation, the curve's included: the same problems
# the pretraining run of each model type (+ --model_type=arm for the ARM): train.py flags, the
# model's shape included (fine-tuning keeps it)
PRETRAIN = ("--task=mix --num_digits=12 --n_layer=3 --n_head=4 --n_embd=96 --batch_size=64 "
            "--max_iters=2000 --warmup_iters=50 --eval_interval=1000 --variance_interval=0 "
            "--seed=0")
TASK = (f"--task=twosort --num_digits=12 --train_size={TRAIN_SIZE} --batch_size=32 "
        "--learning_rate=1e-3 --min_lr=0 --lr_schedule=linear --warmup_iters=0 --grad_clip=1.0 "
        "--eval_problems={n} --eval_problems_mid={n} --variance_interval=0 --ppots_fit_iter=0")
DEFAULTS = dict(
    methods=",".join(ARMS), seeds=10, out="results_sft", device="", max_iters=STEPS,
    pretrain_args=PRETRAIN, task_args=TASK.format(n=EVAL_PROBLEMS), train_args="", jobs=2,
    threads=1, quick=False)
QUICK = dict(seeds=2, max_iters=40, out="results_sft_quick",
             pretrain_args=PRETRAIN.replace("--max_iters=2000", "--max_iters=300"),
             task_args=TASK.format(n=128),
             methods="Standard,Standard-2x,P-POTS+MIRROR-paper,P-POTS+MIRROR")  # the primary arms


def schedule(it):
    """Evaluated every ceil(it / 4) steps and at the end (313: 79, 158, 237 and 313), each time on
    the final evaluation's problems when eval_problems_mid = eval_problems; the study compares
    the points nearest 1/2 and the end (SFT.points). The figure's step 0, the pretrained model's
    accuracy, is the same for every run of a model type and is measured once, by report(). No
    variance logging: the step-0 variance of every arm is measured once, by report()."""
    return [f"--eval_interval={-(-it // 4)}", "--eval_at_start=False"]


def pretrain_flags(cfg, kind):
    flags = shlex.split(cfg["pretrain_args"])
    return flags + ["--model_type=arm"] * (kind == "arm") + (
        [f"--device={cfg['device']}"] if cfg["device"] else [])


def prepare(cfg, jobs):
    """Pretrain the MDM and the ARM (both at once if --jobs >= 2), unless <out>/pretrain holds
    them, made with the same flags; a pretraining that fails stops the study with its reason."""
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"] or 1))
    procs = {}
    for kind in ("mdm", "arm"):
        out_dir = os.path.join(cfg["out"], "pretrain", kind)
        flags, done = pretrain_flags(cfg, kind), os.path.join(out_dir, "flags.json")
        if os.path.exists(done):
            if json.load(open(done)) != flags:
                raise ValueError(f"{out_dir} was pretrained with other flags: use a fresh --out")
            continue
        os.makedirs(out_dir, exist_ok=True)
        print(f"pretraining the {kind.upper()}: python train.py {' '.join(flags)}")
        log = open(os.path.join(out_dir, "stdout.txt"), "w")
        procs[kind] = (subprocess.Popen([sys.executable, "train.py", f"--out_dir={out_dir}",
                                         *flags], cwd=study.ROOT, env=env, stdout=log,
                                        stderr=subprocess.STDOUT), flags, done, time.time())
        if cfg["jobs"] < 2:
            procs[kind][0].wait()
    for kind, (proc, flags, done, start) in procs.items():
        if proc.wait():
            raise ValueError(f"pretraining the {kind.upper()} failed: see "
                             f"{os.path.dirname(done)}/stdout.txt")
        with open(done, "w") as f:
            json.dump(flags, f)
        print(f"pretrained the {kind.upper()} in {time.time() - start:.0f} s")


def pretrained(cfg, conf):
    """(the pretrained model that a run with train.py config `conf` starts from, its SFT task as
    that run trains on it)."""
    kind = "arm" if conf["model_type"] == "arm" else "mdm"
    model, ckpt = load_checkpoint(os.path.join(cfg["out"], "pretrain", kind, "ckpt.pt"))
    return model, training_set(conf, task_from_checkpoint(dict(ckpt, config=conf)))


def step0_accuracy(cfg, conf):
    """{model type: held-out exact match before SFT}, for the pretrained MDM and ARM, on the final
    evaluation's problems of a run with train.py config `conf`, on the CPU: the runs skip their
    step-0 evaluation (eval_at_start=False), which is the same for every seed and arm of one model
    type. The ARM's is the study's reference for what pretraining alone reaches."""
    return {kind: accuracy(*pretrained(cfg, dict(conf, model_type=kind)), conf["eval_problems"])
            for kind in ("mdm", "arm")}


STEP0 = dict(n_x0=32, n_t=8, n_masks=2, n_proj=4)  # the step-0 variance draws per arm
STEP0_SEED = 0  # their generator: the same x0s, rates and masks for every arm


def step0_variance(cfg, jobs, n_x0, n_t, n_masks, n_proj):
    """Per arm, on its pretrained model at SFT step 0, with its own sampler (P-POTS fitted as its
    seed-0 run fits it), masking and finite training set: the draws of the gradient of w l (A, B,
    C by variance.measure, n_proj random directions). The same generator gives every arm the same
    n_x0 training examples, so the bootstrap over them pairs the arms."""
    draws, rows = {}, {}
    for arm in tqdm(cfg["methods"], desc="step-0 variance"):
        job = next(j for j in jobs if j["method"] == arm and j["seed"] == 0)
        conf = job["conf"]
        model, dataset = pretrained(cfg, conf)
        spec = mask_spec_from_config(conf, dataset)
        # a finished run that fitted once saved the fit it trained with; otherwise fit as it does
        reuse = job["record"]["status"] == "ok" and not conf["ppots_refit_every"]
        if conf["model_type"] == "arm":
            sampler = None
        elif conf["t_sampler"] == "ppots" and reuse:
            ckpt = load_checkpoint(os.path.join(study.run_dir(cfg, arm, 0), "ckpt.pt"))[1]
            sampler = sampler_from_state(ckpt["sampler"])
        elif conf["t_sampler"] == "ppots":
            sampler = build_ppots(model, dataset, spec,
                                  generator=torch.Generator().manual_seed(STEP0_SEED),
                                  fit=conf["ppots_fit"], support=conf["ppots_support"])
        else:
            sampler = make_sampler(conf["t_sampler"])
        res = measure(model, dataset, sampler, spec, n_x0, n_t, n_masks, target="grad",
                      generator=torch.Generator().manual_seed(STEP0_SEED), n_proj=n_proj,
                      keep_draws=True)
        draws[arm], rows[arm] = res["draws"], clean_rows(conf["batch_size"], conf["masking"],
                                                     conf["matched_compute"])
    return draws, rows


def variance_vs_outcome(cfg, summary, jobs, n_boot=2000):
    """The step-0 gradient variance of every arm beside its accuracy difference to Standard at the
    end of the schedule: a markdown table (also returned as rows of JSON types)."""
    draws, rows = step0_variance(cfg, jobs, **STEP0)
    ci = versus_baseline(draws, rows, "Standard", n_boot)
    diffs = {c["method"]: c for c in summary["comparisons"]
             if c["ref"] == "Standard" and c["iter"] == summary["iters"][-1]}
    table = ["| arm | clean rows | grad A | grad B | grad C | per-draw total | batch-mean "
             "variance | vs Standard | Δ acc vs Standard [95 % CI], p |", "|" + " --- |" * 9]
    out = []
    for arm in cfg["methods"]:
        d = diffs.get(arm, {}).get("diff")
        table.append("| " + " | ".join([arm, str(rows[arm])] + [
            fmt_ci(ci[arm, k]) for k in ("A", "B", "C", "total", "batch")] + [
            fmt_ci(ci[arm, "ratio"]) if (arm, "ratio") in ci else "—",
            fmt_diff(d) if d else "—"]) + " |")
        out.append(dict(arm=arm, rows=rows[arm], **{k: ci[arm, k] for k in
                                                     ("A", "B", "C", "total", "batch")},
                        acc_mean=summary["methods"][arm]["mean"]))
    ranked = [r for r in out if r["acc_mean"] is not None]
    if len(ranked) >= 3:
        rho = spearman([r["batch"]["est"] for r in ranked], [r["acc_mean"] for r in ranked])
        lowest = min(ranked, key=lambda r: r["batch"]["est"])["arm"]
        table += ["", f"Spearman rank correlation, over the {len(ranked)} arms, between the "
                      f"batch-mean gradient variance at step 0 and mean final accuracy: "
                      f"{rho:+.2f} (descriptive: no interval). Lowest variance: {lowest}."]
    table += ["", f"Gradient variance per draw of w l (the trace, from {STEP0['n_proj']} random "
                  f"directions of the parameters), on the pretrained model at SFT step 0, over "
                  f"{STEP0['n_x0']} training examples x {STEP0['n_t']} rates x "
                  f"{STEP0['n_masks']} masks; [95 % CI]: bootstrap over the examples, "
                  f"paired across arms. Batch-mean variance: per-draw total / clean rows (i.i.d. "
                  f"rows; StraTS's coupling of a batch's rates is not counted, so its row equals "
                  f"Standard's). vs Standard: ratio of batch-mean variances."]
    return "\n".join(table) + "\n", out


def report(cfg, summary, jobs):
    """variance.md (variance_vs_outcome, and the pretrained models' accuracy: the ARM's is the
    reference line), curves.json and curves.png (accuracy against step and forward rows, mean and
    a band of ± 1 std over seeds (ddof 1, as in table.md), the arms of CURVES that ran)."""
    text, rows = variance_vs_outcome(cfg, summary, jobs)
    acc0 = step0_accuracy(cfg, jobs[0]["conf"])
    n = jobs[0]["conf"]["eval_problems"]
    text += (f"\nHeld-out exact match before SFT (step 0, the final evaluation's {n} problems): MDM "
             f"{acc0['mdm']:.3f}; the pretrained ARM {acc0['arm']:.3f}, a reference for what "
             f"pretraining alone reaches, outside the comparisons.\n")
    with open(os.path.join(cfg["out"], "variance.md"), "w") as f:
        f.write("# Step-0 gradient variance and outcome\n\n" + text)
    with open(os.path.join(cfg["out"], "variance.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(text)
    arms = record.curves(jobs, [a for a in CURVES if a in cfg["methods"]],
                        start=lambda conf: [(0, acc0[conf["model_type"]])])
    curves = dict(arms=arms, note=f"the pretrained ARM, before SFT: {acc0['arm']:.3f} "
                                  f"(a reference, not drawn)")
    with open(os.path.join(cfg["out"], "curves.json"), "w") as f:
        json.dump(curves, f, indent=1)
    plots.plot_curves(curves, os.path.join(cfg["out"], "curves.png"))


SFT = study.Study(
    title="Fine-tuning (SFT) on a finite set from a pretrained model, both protocols: held-out "
          "exact match ({max_iters} steps, {flags})",
    methods=METHODS, defaults=DEFAULTS, quick=QUICK, schedule=schedule,
    batch_multiple={"Standard-2x": 2}, controls={m: "Standard-2x" for m in PAPER},
    primary=(("P-POTS+MIRROR-paper", "Standard"), ("P-POTS+MIRROR-paper", "Standard-2x"),
             ("P-POTS+MIRROR", "Standard")),
    points=(0.5, 1.0), prepare=prepare, report=report,
    pairing="every run starts from one pretrained model (seed 0), so every result is conditional "
            "on it; seed s fixes the stream of training examples and the t and mask draws, and "
            "only arms with the same clean rows per step (Standard, P-POTS, the -paper arms) see "
            "the same examples at every step (Standard-2x and the matched arms have their own).",
    notes="Rows and budget: reproduce_sft.py's docstring (-paper: the paper's protocol, 2x "
          "forward rows per step, compute control Standard-2x). The 1/2 point is not lr-decayed "
          "(the linear decay is half-way); the end of the schedule is primary. Loss A, B, C: not "
          "logged in this study (variance.md has every arm's gradient A, B, C at step 0).")


def main(argv):
    """study.main on SFT; --methods=all stands for every row of METHODS. The pretraining runs'
    flags are checked with train.py's checks first, like every SFT run's, before --out exists."""
    argv = [f"--methods={','.join(METHODS)}" if a == "--methods=all" else a for a in argv]
    cfg = study.parse(SFT, argv)
    for kind in ("mdm", "arm"):
        try:
            study.run_config(pretrain_flags(cfg, kind))
        except ValueError as e:
            raise ValueError(f"pretraining the {kind.upper()}: train.py flags: {e}") from None
    return study.main(SFT, argv)


if __name__ == "__main__":
    report_errors()
    sys.exit(1 if main(sys.argv[1:]) else 0)
