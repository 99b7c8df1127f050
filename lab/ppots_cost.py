"""P-POTS's one-off cost as train.py pays it, and the fitted law against the 20-start fit that
fit_epr's defaults replaced (docs/scaling.md, "P-POTS's one-off cost").

    python -m lab.ppots_cost               # one timed default P-POTS run, then the KL on 7 curves
    python -m lab.ppots_cost --runs=3 --curves=False

Cost: `python train.py --t_sampler=ppots` with every other default runs in this process (runpy)
into a temporary out_dir, with samplers.measure_curve, samplers.build_ppots, samplers.describe_fit
and figures.plot_ppots wrapped in timers, so that the one-off is timed inside the run it is a
share of, under the same load: measure (measure_curve's forward passes), fit (build_ppots less
measure: the EPR fit and the table), describe and plot, each against the run's wall time
(train.py's first line to its last: the interpreter's start and the imports are not in it).

KL: the curve that run measured, and the curves of more train.py runs: seed 2 at ppots_fit_iter;
seed 1 refitted every 100 steps up to step 400; the SFT regime's start (lab.reproduce_sft's quick
pretraining, then its task at SFT step 0). Each curve is fitted by fit_epr's defaults, by the fit
they replaced, fit_epr(n_starts=20, agree=None, history_size=100) (20 random starts, all run,
L-BFGS history 100), and, on a refit, warm-started from the previous curve's fit (init=, as
train.py refits). Reported: each fit's seconds and KL(p_20 || p) between the densities sample()
draws (PPOTS's CELLS equal cells of [0, 1]).
"""
import contextlib
import os
import runpy
import shlex
import sys
import tempfile
import time

import torch

import figures
import samplers
from configurator import configure, report_errors
from lab.reproduce_sft import QUICK

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMED = ((samplers, "measure_curve"), (samplers, "build_ppots"), (samplers, "describe_fit"),
         (figures, "plot_ppots"))
TWENTY_STARTS = dict(n_starts=20, agree=None, history_size=100)  # the fit the defaults replaced
QUIET = ["--eval_at_start=False", "--eval_interval=100000", "--variance_interval=0",
         "--eval_problems=16"]  # the curve runs: next to no evaluation
PPOTS = ["--t_sampler=ppots", *QUIET]


@contextlib.contextmanager
def timed_calls():
    """Within: the TIMED functions wrapped in timers; yields {name: [(seconds, result), ...]}."""
    calls, originals = {name: [] for _, name in TIMED}, [(m, n, getattr(m, n)) for m, n in TIMED]

    def timer(name, fn):
        def timed(*args, **kw):
            start = time.perf_counter()
            result = fn(*args, **kw)
            calls[name].append((time.perf_counter() - start, result))
            return result
        return timed
    for module, name, fn in originals:
        setattr(module, name, timer(name, fn))
    try:
        yield calls
    finally:
        for module, name, fn in originals:
            setattr(module, name, fn)


def train(flags, out_dir):
    """train.py with flags, in this process, into out_dir: (its seconds, its timed calls).
    train.py imports its P-POTS functions when it starts, so it gets the wrapped ones."""
    argv, sys.argv = sys.argv, ["train.py", f"--out_dir={out_dir}", *flags]
    try:
        with timed_calls() as calls:
            start = time.perf_counter()
            runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
            return time.perf_counter() - start, calls
    finally:
        sys.argv = argv


def one_off(seconds, calls):
    """{part: seconds} of a run's one-off: measure, fit (and table), describe, plot; total, run."""
    total = lambda name: sum(s for s, _ in calls[name])
    parts = {"measure": total("measure_curve"),
             "fit": total("build_ppots") - total("measure_curve"),
             "describe": total("describe_fit"), "plot": total("plot_ppots")}
    return parts | {"total": sum(parts.values()), "run": seconds}


def density(curve, params):
    """The density that sample() draws for EPR params: PPOTS.p, on CELLS equal cells of [0, 1]."""
    return samplers.sampler_from_state(dict(
        name="ppots", t_grid=curve["t"], sqrt_m=curve["m"].sqrt(), fit="epr", support="full",
        n_starts=0, seed=0, max_weight=None, mix=0.0, params=params)).p


def compare(curve, previous=None):
    """{fit: (seconds, KL(p_20 || p), params)} for the 20-start fit, the default and, given the
    previous curve's default fit (its params), the default warm-started from it."""
    kinds = {"20 starts": TWENTY_STARTS, "default": {}} | (
        {} if previous is None else {"warm": dict(init=previous)})
    fits = {}
    for kind, kw in kinds.items():
        start = time.perf_counter()
        params = samplers.fit_epr(curve["t"], curve["m"].sqrt(), **kw)
        fits[kind] = (time.perf_counter() - start, params)
    ref = density(curve, fits["20 starts"][1])
    return {kind: (s, (ref * (ref / density(curve, p)).log()).mean().item(), p)
            for kind, (s, p) in fits.items()}


def main(argv):
    cfg = configure(dict(runs=1, curves=True, train_args=""), argv)
    if cfg["runs"] < 1:
        raise ValueError(f"--runs must be >= 1, got {cfg['runs']}")
    print(f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    curves = []  # (label, curve, the previous curve's label on a refit, or None)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(cfg["runs"]):
            seconds, calls = train(["--t_sampler=ppots", *shlex.split(cfg["train_args"])],
                                   os.path.join(tmp, f"default{i}"))
            cost = one_off(seconds, calls)
            print(f"run {i + 1}: {cost['run']:.1f} s; P-POTS one-off {cost['total']:.2f} s = "
                  f"{100 * cost['total'] / cost['run']:.2f} % of it: " + ", ".join(
                      f"{k} {cost[k]:.2f} s ({100 * cost[k] / cost['run']:.2f} %)"
                      for k in ("measure", "fit", "describe", "plot")))
        curves.append(("the timed run's curve", calls["measure_curve"][0][1], None))
        if cfg["curves"]:
            _, calls = train(PPOTS + ["--seed=2", "--max_iters=101"], os.path.join(tmp, "s2"))
            curves.append(("seed 2, step 100", calls["measure_curve"][0][1], None))
            _, calls = train(PPOTS + ["--seed=1", "--max_iters=401", "--ppots_refit_every=100"],
                             os.path.join(tmp, "s1"))
            curves += [(f"seed 1, step {100 * k}", c, f"seed 1, step {100 * (k - 1)}" * (k > 1))
                       for k, (_, c) in enumerate(calls["measure_curve"], 1)]
            pre = os.path.join(tmp, "pretrain")
            train(shlex.split(QUICK["pretrain_args"]) + QUIET, pre)
            _, calls = train(PPOTS + shlex.split(QUICK["task_args"]) + [
                f"--init_from={pre}/ckpt.pt", "--max_iters=1", "--eval_problems=16"],
                os.path.join(tmp, "sft"))
            curves.append(("SFT start (quick pretraining)", calls["measure_curve"][0][1], None))
    print(f"\nload average {os.getloadavg()[0]:.1f}; each curve fitted three ways, KL(p_20 || p) "
          f"between the densities sample() draws")
    print(f"{'curve':<30}{'20 starts s':>12}{'default s':>11}{'KL':>10}{'warm s':>9}{'KL':>10}")
    defaults = {}
    for label, curve, previous in curves:
        res = compare(curve, defaults[previous] if previous else None)
        defaults[label] = res["default"][2]
        warm = f"{res['warm'][0]:>9.2f}{res['warm'][1]:>10.1e}" if "warm" in res else ""
        print(f"{label:<30}{res['20 starts'][0]:>12.2f}{res['default'][0]:>11.2f}"
              f"{res['default'][1]:>10.1e}{warm}")


if __name__ == "__main__":
    report_errors()
    main(sys.argv[1:])
