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
is FAILED: recorded with its reason, shown as FAILED (never as a score), left out of the
comparisons, and retried on the next call (a failure can be transient); the study goes on and exits
1 after writing the table. <out>/runs.jsonl holds one fsynced line per finished run, written by
this process only, under a signature of its exact train.py flags: a study resumes (a torn last line
is dropped), a changed budget reuses nothing (after changing the code, use a fresh --out). The
thread count is not in the signature; it changes float rounding, which training can amplify, so
pin --threads for bit-identical runs under different --jobs (on one CPU kind and torch build:
another CPU kind rounds differently too). A run is scored by the study's Metric and
read into its record by record.py.

Comparisons (table.py, stats.py). Each row is compared with the baseline, a row with a compute
control also with that control, and every pair of the study's primary family, at each of the
study's points (the evaluated iteration nearest to each fraction of max_iters), paired by seed
over the seeds where both runs have a value there (what a seed holds fixed across arms: the
study's pairing sentence): the difference of mean scores with its 95 % bootstrap CI and paired
permutation p, and the ratio of seed stds with its CI and paired permutation p. Holm adjusts the p
within three families (the primary pairs x points x both claims; the other differences; the other
std ratios), and a difference is called only when its CI and its adjusted p agree (stats.verdict);
a std ratio that the bounds of accuracy decide is 'at ceiling' or 'at floor'. For the primary pairs
the paper's claims, a better mean (up for accuracy, down for the val ELBO) and seed std down, are
read the same way; "the best baseline run is worse than our worst run" is a plain min/max. Under
the comparisons: the std test's power at the study's n. Output: <out>/table.md, table.png and
summary.json (the table's numbers, machine-readable), then whatever the study's report writes.
"""
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Callable

from tqdm import tqdm

import train_config
from configurator import configure
from lab import plots, table
from lab.record import ACCURACY, Metric, at, final_result, forward_rows, mean

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # train.py's folder


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
    primary: tuple = ()   # (ours, ref) pairs: the paper's claims, one Holm family (table.py)
    points: tuple = (1.0,)  # fractions of max_iters: each compared at the nearest evaluation
    pairing: str = ""     # what seed s holds fixed across arms: one sentence for the notes
    curve_rows: int = 69 * 32 * 4                   # forward rows of one P-POTS curve
    notes: str = ""                                 # the table's closing footnote
    prepare: Callable | None = None  # prepare(cfg, jobs): after planning, before any run
    report: Callable | None = None   # report(cfg, summary, jobs): after table.md, summary.json
    metric: Metric = ACCURACY        # what a run is scored by


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
    for pair in study.primary:
        if len(pair) != 2 or not set(pair) <= set(study.methods):
            raise ValueError(f"Study.primary: {pair!r} is not an (ours, ref) pair of methods")
    if not study.points or not all(0 < f <= 1 for f in study.points):
        raise ValueError(f"Study.points must be fractions of max_iters in (0, 1], got "
                         f"{study.points!r}")
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
            if conf["task"] == "text" and study.metric.key == "acc":
                raise ValueError("this study scores held-out exact match: use a synthetic task")
            jobs.append(dict(method=method, seed=seed, flags=flags, sig=signature(flags),
                             conf=conf))
    return jobs


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


def run_dir(cfg, method, seed):
    return os.path.abspath(os.path.join(cfg["out"], "runs", f"{method}_s{seed}"))


def run(cfg, job, threads, metric=ACCURACY):
    """Train one (method, seed) in a subprocess with `threads` torch threads; its record, status
    'ok' with the final metrics (final_result) or 'failed' with the reason."""
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
                    **final_result(out_dir, proc.returncode, job["conf"]["max_iters"], metric))
    except ValueError as e:
        return dict(rec, status="failed", reason=str(e))


def evaluated(study, cfg, jobs):
    """The iterations compared, one per fraction f in study.points: the evaluation nearest to
    f x max_iters among the successful runs' curves (ties: the later one), ascending, once each;
    f = 1 is max_iters, the final evaluation every successful run has."""
    it = cfg["max_iters"]
    done = {i for j in jobs if j["record"]["status"] == "ok"
            for i, _ in j["record"].get("curve", [])}
    done.add(it)
    return sorted({min(done, key=lambda i: (abs(i - f * it), -i)) for f in study.points})


def summarise(study, cfg, jobs):
    """Everything table.md and table.png show, as JSON types (None: failed or not measured):
    config, iters (study.points as evaluated iterations), methods (per method: the final point's
    numbers at the top level, every point under points[str(iter)]), comparisons (table.compare,
    judged by table.judge), std_power (table.power) and metric (the Study's, as a dict)."""
    iters = evaluated(study, cfg, jobs)
    methods = {}
    for m in cfg["methods"]:
        recs = [j["record"] for j in jobs if j["method"] == m]
        ok = [r for r in recs if r["status"] == "ok"]
        conf = next(j["conf"] for j in jobs if j["method"] == m)
        train_rows, curve_rows = forward_rows(conf, study.curve_rows)
        points = {str(it): table.arm(*zip(*(at(r, it, study.metric) for r in recs)),
                                     bounded=study.metric.bounded) for it in iters}
        methods[m] = dict(
            seeds=[r["seed"] for r in recs],
            failed=[dict(seed=r["seed"], reason=r["reason"]) for r in recs if r["status"] != "ok"],
            **points[str(iters[-1])],
            **{k: mean(r.get(k) for r in ok) for k in ("val_bits", "loss_A", "loss_B", "loss_C",
                                                       "clip_frac", "epochs", "seconds")},
            forward_rows=train_rows, curve_rows=curve_rows, points=points)
    pairs = []
    for m in methods:  # the baseline, the compute control, the primary refs: in this order, once
        refs = (study.baseline, study.controls.get(m), *(r for o, r in study.primary if o == m))
        pairs += [(m, r) for r in dict.fromkeys(refs) if r in methods and r != m]
    comparisons = [dict(method=m, ref=r, **table.compare(methods[m], methods[r], it,
                                                         study.metric.bounded))
                   for it in iters for m, r in pairs]
    table.judge(comparisons, methods, study.primary, study.metric.lower_is_better)
    config = {k: cfg[k] for k in ("methods", "seeds", "max_iters", "task_args", "train_args")}
    return dict(config=config, iters=iters, methods=methods, comparisons=comparisons,
                std_power=table.power(comparisons), metric=asdict(study.metric))


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
        futures = {pool.submit(run, cfg, j, threads, study.metric): j for j in todo}
        for future in tqdm(as_completed(futures), total=len(todo), desc="runs", dynamic_ncols=True):
            rec = futures[future]["record"] = future.result()
            append_run(db_path, rec)  # this thread only: one line per finished run
            key, f = study.metric.key, study.metric.fmt
            tqdm.write(f"{rec['method']} seed {rec['seed']}: " + (
                f"{key} {rec[key]:{f}}, val {rec['val_bits']:.4f} bits/token, {rec['seconds']:.0f}s"
                if rec["status"] == "ok" else f"FAILED: {rec['reason']}"))
    finally:
        pool.shutdown(cancel_futures=True)  # on Ctrl-C no queued run starts
    summary = summarise(study, cfg, jobs)
    with open(os.path.join(cfg["out"], "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    table.write_table(study, summary, os.path.join(cfg["out"], "table.md"))
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
