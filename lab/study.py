"""The machinery of a study: methods x seeds of train.py runs at one budget, cached, and one table
in which every comparison carries its interval. A study script (reproduce.py: from scratch)
defines a Study, what its rows are and how its runs are scheduled, and calls main(study, argv).

Flags. A run's train.py flags are --seed, --max_iters, the study's schedule(max_iters), --device
if given, then --task_args, the method's flags and --train_args, in that order (a later flag
wins), and for a row of batch_multiple --batch_size=k x the batch of the flags before it, last.
These flag strings may hold the format field {out}: it becomes the absolute path of --out before
they are split, so a row can start from a checkpoint the study made (prepare), e.g.
--init_from={out}/pretrain/mdm/ckpt.pt; that path is then in the signature, so the same study
under another --out trains again. Every run's flags are checked as train.py checks them before
anything is written.

Runs. Each (method, seed) is one `python train.py` in <out>/runs/<method>_s<seed>, up to --jobs at
once, with --threads torch threads each (0: max(1, cores // jobs)). A run that exits non-zero, has
no final evaluation in its log.jsonl, or logs a non-finite loss, gradient norm, val ELBO or accuracy
is FAILED: recorded with its reason, shown as FAILED (never as an accuracy), left out of the
comparisons, and retried on the next call (a failure can be transient); the study goes on and exits
1 after writing the table. <out>/runs.jsonl holds one fsynced line per finished run, written by
this process only, under a signature of its exact train.py flags: a study resumes (a torn last line
is dropped), a changed budget reuses nothing (after changing the code, use a fresh --out). The
thread count is not in the signature; it changes float rounding, which training can amplify, so
pin --threads for bit-identical runs under different --jobs. A run's record keeps its final
accuracy, val ELBO and variance components, the fraction of clipped steps (clip_frac), the
accuracy of every evaluation (curve) and its last logged epoch (epochs), when train.py logs them.

Intervals (stats.py). Each row is compared with the baseline, a row with a compute control also
with that control, paired by seed (a seed fixes the init, and the x0 stream at equal batch_size)
over the seeds where both runs succeeded: the difference of mean accuracy with its 95 % bootstrap
CI and paired permutation p, and the ratio of seed stds with its CI; "not detectable" when the CI
covers 0 (1). For the claimed rows the paper's claims, mean up and seed std down, are read from
those CIs as holds / not detectable / contradicted; "the best baseline run stays below our worst
run" is a plain min/max. Output: <out>/table.md, table.png and summary.json (the table's numbers,
machine-readable), then whatever the study's report writes.
"""
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from tqdm import tqdm

import train_config
from configurator import configure
from lab import plots
from lab.stats import fmt_diff, paired_difference, std_ratio, verdict
from masking import clean_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # train.py's folder
FINITE = ("loss", "grad_norm", "val_nats", "val_bits", "acc")  # log.jsonl values a result needs
NOTES = ("Loss A, B, C: at the last step, means over seeds (ARM: A = B = 0). Clipped steps: the "
         "fraction of steps whose gradient norm exceeded grad_clip before clipping, mean over "
         "seeds. Forward rows: of training; + curve: P-POTS's measurement, no backward, outside "
         "the budget. Δ: difference of mean accuracy, 95 % bootstrap CI over seeds, paired "
         "permutation p; std ratio: std(method) / std(vs), ddof 1; 'not detectable': the CI "
         "covers 0 (1). Time: wall clock per run, start-up, evaluation, variance and curve "
         "included.")


@dataclass(frozen=True)
class Study:
    title: str            # the table's heading (may use {max_iters} and {flags} format fields)
    methods: dict         # row name -> train.py flags string, placed after task_args
    defaults: dict        # the CLI defaults (methods, seeds, out, device, max_iters, task_args,
                          # train_args, jobs, threads, quick)
    quick: dict           # the --quick preset
    schedule: Callable    # (max_iters) -> list of per-run schedule flags, after --seed/--max_iters
    batch_multiple: dict = field(default_factory=dict)  # row -> k: --batch_size=k x the batch
    baseline: str = "Standard"
    controls: dict = field(default_factory=dict)   # row -> its compute control row
    claimed: tuple = ()                             # rows the paper's three claims are checked for
    curve_rows: int = 69 * 32 * 4                   # forward rows of one P-POTS curve
    notes: str = ""                                 # the table's closing footnote
    prepare: Callable | None = None  # prepare(cfg, jobs): after planning, before any run
    report: Callable | None = None   # report(cfg, summary, jobs): after table.md, summary.json


def parse(study, argv):
    """configurator flags; a bare --quick means --quick=True; --quick's preset loses to explicit
    flags. Every check that needs no train.py flags, --out's included: nothing is written yet."""
    argv = [a + "=True" if a == "--quick" else a for a in argv]
    cfg = configure(dict(study.defaults), argv)
    if cfg["quick"]:
        cfg = configure({**study.defaults, **study.quick}, argv)
    cfg["methods"] = list(dict.fromkeys(m.strip() for m in cfg["methods"].split(",") if m.strip()))
    for m in cfg["methods"]:
        if m not in study.methods:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(study.methods)}")
    if not cfg["methods"]:
        raise ValueError("--methods is empty; choose from " + ", ".join(study.methods))
    for key in ("seeds", "max_iters", "jobs"):
        if cfg[key] < 1:
            raise ValueError(f"--{key} must be >= 1, got {cfg[key]}")
    if cfg["threads"] < 0:
        raise ValueError(f"--threads must be >= 0 (0 = cores // jobs), got {cfg['threads']}")
    path = os.path.abspath(cfg["out"])
    while not os.path.exists(path):  # the nearest existing ancestor decides
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ValueError(f"--out={cfg['out']}: {path} is a file, not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--out={cfg['out']}: {path} is not writable")
    return cfg


def run_config(flags):
    """train.py's config under these flags (train_config.parse: names, types), with every range
    and combination check train.py makes before it starts (train_config.check)."""
    conf = train_config.parse([f if f.startswith("--") else os.path.join(ROOT, f) for f in flags])
    train_config.check(conf)
    return conf


def train_flags(study, cfg, method, seed):
    """The train.py flags of one run (out_dir aside), in the order the module docstring gives."""
    it = cfg["max_iters"]
    flags = [f"--seed={seed}", f"--max_iters={it}", *study.schedule(it)]
    flags += [f"--device={cfg['device']}"] if cfg["device"] else []
    out = shlex.quote(os.path.abspath(cfg["out"]))
    try:
        for args in (cfg["task_args"], study.methods[method], cfg["train_args"]):
            flags += shlex.split(args.replace("{out}", out))
    except ValueError as e:
        raise ValueError(f"cannot split --task_args/--train_args into flags: {e}") from None
    if method in study.batch_multiple:
        k = study.batch_multiple[method]
        flags.append(f"--batch_size={k * run_config(flags)['batch_size']}")
    return flags


def signature(flags):
    return hashlib.sha1(json.dumps(flags).encode()).hexdigest()[:12]


def plan(study, cfg):
    """Every run of the study, dict(method, seed, flags, sig, conf), its flags checked now."""
    jobs = []
    for method in cfg["methods"]:
        for seed in range(cfg["seeds"]):
            try:
                flags = train_flags(study, cfg, method, seed)
                conf = run_config(flags)
            except ValueError as e:
                raise ValueError(f"{method}: train.py flags: {e}") from None
            if conf["task"] == "text":
                raise ValueError("a study scores held-out exact match: use --task=sort or add")
            jobs.append(dict(method=method, seed=seed, flags=flags, sig=signature(flags),
                             conf=conf))
    return jobs


def forward_rows(conf, curve_rows):
    """(training, P-POTS curve) forward rows of a run with train.py config `conf`: max_iters x
    clean_rows x views (2 for mirror/pair); one curve of curve_rows per P-POTS measurement (a refit
    measures again unless online)."""
    views = 2 if conf["masking"] in ("mirror", "pair") and conf["model_type"] == "mdm" else 1
    every = 0 if conf["ppots_online"] else conf["ppots_refit_every"]
    fits = len(range(conf["ppots_fit_iter"], conf["max_iters"], every or max(1, conf["max_iters"])))
    fits *= conf["t_sampler"] == "ppots"
    rows = clean_rows(conf["batch_size"], conf["masking"], conf["matched_compute"])
    return conf["max_iters"] * rows * views, fits * curve_rows * views


def load_runs(path):
    """The records of runs.jsonl. An unparseable last line (a study killed mid-write) is dropped
    and the file rewritten without it; an unparseable line anywhere else is an error."""
    text = open(path).read() if os.path.exists(path) else ""
    lines, records = text.splitlines(), []
    for i, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not {"method", "seed", "sig"} <= rec.keys():
                raise ValueError("not a run record")
            records.append(rec)
            rec.setdefault("status", "ok")  # written before failed runs were recorded
        except ValueError as e:
            if i < len(lines):
                raise ValueError(f"{path} line {i} is corrupt ({e}): repair or delete that line")
            print(f"{path}: dropping its torn last line {i} (a study interrupted mid-write)")
    if text and (len(records) < len(lines) or not text.endswith("\n")):  # appends start a line
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(rec) + "\n" for rec in records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    return records


def append_run(path, rec):
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def final_result(out_dir, returncode, max_iters):
    """A finished run's metrics from its log.jsonl; ValueError(why) if the run is not a result."""
    if returncode:
        lines = open(os.path.join(out_dir, "stdout.txt")).read().strip().splitlines()
        last = lines[-1].removeprefix("error: ") if lines else "(no output)"
        raise ValueError(f"train.py exited with status {returncode}: {last}")
    try:
        log = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    except (OSError, ValueError) as e:
        raise ValueError(f"log.jsonl unreadable: {e}") from None
    for r in log:
        for key in FINITE:
            if key in r and not (isinstance(r[key], (int, float)) and math.isfinite(r[key])):
                raise ValueError(f"non-finite {key} ({r[key]}) at iteration {r.get('iter')}")
    final = [r for r in log if "val_bits" in r and "acc" in r and r["iter"] == max_iters]
    if not final:
        raise ValueError(f"log.jsonl has no final evaluation with accuracy (iteration {max_iters})")
    var = [r["variance"] for r in log if "variance" in r and r["iter"] == max_iters]
    abc = {f"{t}_{k}": var[-1][t][k] if var else None for t in ("loss", "grad") for k in "ABC"}
    epochs = [r["epoch"] for r in log if "epoch" in r]
    return dict(iter=max_iters, acc=final[-1]["acc"], val_bits=final[-1]["val_bits"], **abc,
                clip_frac=mean(r["clip_frac"] for r in log if "clip_frac" in r),
                epochs=epochs[-1] if epochs else None,
                curve=[[r["iter"], r["acc"]] for r in log if "acc" in r])


def run_dir(cfg, method, seed):
    return os.path.abspath(os.path.join(cfg["out"], "runs", f"{method}_s{seed}"))


def run(cfg, job, threads):
    """Train one (method, seed) in a subprocess with `threads` torch threads; its record, status
    'ok' with the final metrics or 'failed' with the reason."""
    out_dir = run_dir(cfg, job["method"], job["seed"])
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.time()
    with open(os.path.join(out_dir, "stdout.txt"), "w") as f:
        proc = subprocess.run([sys.executable, "train.py", f"--out_dir={out_dir}", *job["flags"]],
                              cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    rec = dict(method=job["method"], seed=job["seed"], sig=job["sig"], flags=job["flags"],
               threads=threads, seconds=time.time() - start)
    try:
        return dict(rec, status="ok",
                    **final_result(out_dir, proc.returncode, job["conf"]["max_iters"]))
    except ValueError as e:
        return dict(rec, status="failed", reason=str(e))


def compare(a, b, claimed):
    """Method summary a against b, paired over the seeds where both runs succeeded, with the
    paper's three claims if `claimed`. Verdicts: stats.verdict on the CI (the ratio's minus 1)."""
    x, y = dict(zip(a["seeds"], a["acc"])), dict(zip(b["seeds"], b["acc"]))
    seeds = [s for s in x if x[s] is not None and y.get(s) is not None]
    xs, ys = [x[s] for s in seeds], [y[s] for s in seeds]
    diff = paired_difference(xs, ys) if len(seeds) >= 2 else None
    ratio = std_ratio(xs, ys) if len(seeds) >= 2 and np.std(ys) > 0 else None
    up = verdict(diff["lo"], diff["hi"], "higher") if diff else None
    down = verdict(ratio["lo"] - 1, ratio["hi"] - 1, "lower") if ratio else None
    c = dict(seeds=seeds, diff=diff, std_ratio=ratio,
             diff_verdict={"holds": "higher", "contradicted": "lower"}.get(up, up),
             std_verdict={"holds": "lower", "contradicted": "higher"}.get(down, down))
    if claimed:
        best, worst = b["acc_max"], a["acc_min"]
        c["claims"] = dict(mean_up=up, std_down=down, best_ref=best, worst_ours=worst,
                           best_below_worst=None if None in (best, worst) else best < worst)
    return c


def mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarise(study, cfg, jobs):
    """Everything table.md and table.png show, as JSON types (None: failed or not measured)."""
    methods = {}
    for m in cfg["methods"]:
        recs = [j["record"] for j in jobs if j["method"] == m]
        ok = [r for r in recs if r["status"] == "ok"]
        acc = [r["acc"] for r in ok]
        conf = next(j["conf"] for j in jobs if j["method"] == m)
        train_rows, curve_rows = forward_rows(conf, study.curve_rows)
        methods[m] = dict(
            seeds=[r["seed"] for r in recs], acc=[r.get("acc") for r in recs],
            failed=[dict(seed=r["seed"], reason=r["reason"]) for r in recs if r["status"] != "ok"],
            acc_mean=mean(acc), acc_std=float(np.std(acc, ddof=1)) if len(acc) > 1 else None,
            acc_min=min(acc, default=None), acc_max=max(acc, default=None),
            **{k: mean(r.get(k) for r in ok) for k in ("val_bits", "loss_A", "loss_B", "loss_C",
                                                       "clip_frac", "epochs", "seconds")},
            forward_rows=train_rows, curve_rows=curve_rows)
    refs = lambda m: dict.fromkeys((study.baseline, study.controls.get(m)))  # in this order, once
    comparisons = [dict(method=m, ref=ref, **compare(methods[m], methods[ref], m in study.claimed))
                   for m in methods for ref in refs(m) if ref in methods and ref != m]
    config = {k: cfg[k] for k in ("methods", "seeds", "max_iters", "task_args", "train_args")}
    return dict(config=config, methods=methods, comparisons=comparisons)


def write_table(study, summary, path):
    """Markdown: each method's runs; the comparisons; the paper's claims; the failed runs."""
    cfg, methods, comparisons = summary["config"], summary["methods"], summary["comparisons"]
    num = lambda x, f=".3f": "—" if x is None else format(x, f)
    row = lambda *cells: "| " + " | ".join(map(str, cells)) + " |"
    flags = " ".join(f for f in (cfg["task_args"], cfg["train_args"]) if f)
    lines = ["# " + study.title.format(max_iters=cfg["max_iters"], flags=flags), "",
             row("method", "runs", "acc mean ± std", "min", "max", "per seed",
                 "val ELBO (bits/tok)", "loss A", "loss B", "loss C", "clipped steps",
                 "forward rows / run", "time (s)"), row(*["---"] * 13)]
    for m, s in methods.items():
        n_failed = len(s["failed"])
        runs = f"{len(s['acc']) - n_failed}" + f" + {n_failed} FAILED" * bool(n_failed)
        rows = f"{s['forward_rows']:,}" + f" + {s['curve_rows']:,} curve" * bool(s["curve_rows"])
        per_seed = " ".join("FAILED" if a is None else f"{a:.3f}" for a in s["acc"])
        lines.append(row(m, runs, f"{num(s['acc_mean'])} ± {num(s['acc_std'])}", num(s["acc_min"]),
                         num(s["acc_max"]), per_seed, num(s["val_bits"], ".4f"),
                         *(num(s[k], ".3g") for k in ("loss_A", "loss_B", "loss_C")),
                         num(s["clip_frac"], ".2f"), rows, num(s["seconds"], ".0f")))
    lines += ["", "## Comparisons, paired by seed over the seeds where both runs succeeded", "",
              row("method", "vs", "paired seeds", "Δ mean acc [95 % CI], p", "Δ",
                  "std ratio [95 % CI]", "std"), row(*["---"] * 7)]
    for c in comparisons:
        r = c["std_ratio"]
        lines.append(row(c["method"], c["ref"], len(c["seeds"]),
                         fmt_diff(c["diff"]) if c["diff"] else "— (< 2 paired seeds)",
                         c["diff_verdict"] or "—",
                         "—" if r is None else f"{r['ratio']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]",
                         c["std_verdict"] or "— (std 0 or < 2 seeds)"))
    n = min((len(c["seeds"]) for c in comparisons), default=99)
    if n <= 5:
        lines += ["", f"With {n} paired seeds no p-value can go below {2 ** (1 - n):.2g} and the "
                      "interval is close to the range of the differences: a smoke test."]
    claims = [c for c in comparisons if "claims" in c]
    if claims:
        lines += ["", "## The paper's claims", "",
                  row("ours", "vs", "mean accuracy up", "seed std down", "\"the best baseline run "
                      "stays below our worst run\" (min/max, no interval)"), row(*["---"] * 5)]
    for c in claims:
        k = c["claims"]
        below = {True: "holds", False: "does not hold", None: "—"}[k["best_below_worst"]]
        lines.append(row(c["method"], c["ref"], k["mean_up"] or "untestable (< 2 seeds)",
                         k["std_down"] or "untestable (std 0 or < 2 seeds)",
                         f"{below}: best {c['ref']} {num(k['best_ref'])}, worst {c['method']} "
                         f"{num(k['worst_ours'])}"))
    failed = [f"- {m} seed {f['seed']}: {f['reason']}"
              for m, s in methods.items() for f in s["failed"]]
    lines += ["", f"{sum(len(s['acc']) for s in methods.values())} runs, {len(failed)} FAILED (not "
                  "results; retried on the next call)."] + failed
    lines += ["", " ".join(filter(None, (study.notes, NOTES)))]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(study, argv):
    """Run the study, reusing cached runs; write table.md, table.png and summary.json, then the
    study's report. Returns the number of failed runs."""
    cfg = parse(study, argv)
    jobs = plan(study, cfg)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = cfg["threads"] or max(1, cores // cfg["jobs"])
    os.makedirs(cfg["out"], exist_ok=True)
    if study.prepare:
        study.prepare(cfg, jobs)
    db_path = os.path.join(cfg["out"], "runs.jsonl")
    done = {(r["method"], r["seed"], r["sig"]): r for r in load_runs(db_path)
            if r["status"] == "ok"}  # failed runs are retried
    for j in jobs:
        j["record"] = done.get((j["method"], j["seed"], j["sig"]))
    todo = [j for j in jobs if j["record"] is None]
    print(f"{len(jobs)} runs: {len(jobs) - len(todo)} cached in {db_path}, {len(todo)} to train "
          f"({cfg['jobs']} at a time, {threads} torch threads each)")
    pool = ThreadPoolExecutor(cfg["jobs"])
    try:
        futures = {pool.submit(run, cfg, j, threads): j for j in todo}
        for future in tqdm(as_completed(futures), total=len(todo), desc="runs", dynamic_ncols=True):
            rec = futures[future]["record"] = future.result()
            append_run(db_path, rec)  # this thread only: one line per finished run
            tqdm.write(f"{rec['method']} seed {rec['seed']}: " + (
                f"acc {rec['acc']:.3f}, val {rec['val_bits']:.4f} bits/token, {rec['seconds']:.0f}s"
                if rec["status"] == "ok" else f"FAILED: {rec['reason']}"))
    finally:
        pool.shutdown(cancel_futures=True)  # on Ctrl-C no queued run starts
    summary = summarise(study, cfg, jobs)
    with open(os.path.join(cfg["out"], "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    write_table(study, summary, os.path.join(cfg["out"], "table.md"))
    plots.plot_results(summary, os.path.join(cfg["out"], "table.png"))
    if study.report:
        study.report(cfg, summary, jobs)
    print(open(os.path.join(cfg["out"], "table.md")).read())
    print(f"wrote table.md, table.png and summary.json in {cfg['out']}")
    failed = [j["record"] for j in jobs if j["record"]["status"] != "ok"]
    if failed:
        print(f"error: {len(failed)} of {len(jobs)} runs FAILED (see table.md; retried on the next "
              f"call), first: {failed[0]['method']} seed {failed[0]['seed']}: "
              f"{failed[0]['reason']}",
              file=sys.stderr)
    return len(failed)
