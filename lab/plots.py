"""The lab's figures, one PNG each (the run figures are the root's figures.py):

    plot_components(curves, path)    per-t components v(t) and g(t)^2 for each masking mode
    plot_results(summary, path)      a study's table: one dot per seed, bar = mean
    plot_sft_curves(curves, path)    lab/reproduce_sft.py: accuracy against step and forward rows

The README's figures are regenerated from real runs by

    python -m lab.plots --run=out --study=results --sft=results_sft --assets=assets

with out/ from `python train.py`, results/ from `python -m lab.reproduce` (its Standard seed 0
checkpoint, results/runs/Standard_s0/ckpt.pt, is the model of the per-t and P-POTS figures) and
results_sft/ from `python -m lab.reproduce_sft` (its curves.json; --sft= skips sft_curves.png).
"""
import json
import os
import sys

import numpy as np
import torch

from checkpoint import load_checkpoint
from configurator import configure, report_errors
from data import task_from_checkpoint
from figures import new_figure, plot_ppots, plot_run, save
from masking import MaskSpec
from samplers import PPOTS, measure_curve


def plot_components(curves, path):
    """Per-t components from samplers.measure_curve, one line per masking mode (curves: {mode:
    dict(t, m, g, v)}, e.g. standard, pair, mirror): v(t) = E_x0 Var(l | x0, t), the integrand of
    A over uniform t, and g(t)^2 = (E[l | t])^2, both on a log scale."""
    fig, axes = new_figure(1, 2, figsize=(10, 3.5))
    for mode, curve in curves.items():
        axes[0].plot(curve["t"], curve["v"], label=mode)
        axes[1].plot(curve["t"], curve["g"] ** 2, label=mode)
    axes[0].set(xlabel="t", yscale="log", title="v(t) = E Var(l | x0, t): the per-t A")
    axes[1].set(xlabel="t", yscale="log", title="g(t)^2 = E[l | t]^2")
    axes[0].legend()
    save(fig, path)


def plot_results(summary, path):
    """reproduce.py's summary.json: one dot per successful seed per method, a bar at the mean;
    failed runs are counted under the method's name."""
    methods = summary["methods"]
    fig, ax = new_figure(figsize=(0.8 * len(methods) + 2, 4))
    for i, s in enumerate(methods.values()):
        acc = [a for a in s["acc"] if a is not None]
        ax.bar(i, s["acc_mean"] or 0, color="C7" if s is methods.get("ARM") else "C0", alpha=0.35)
        ax.plot(i + np.linspace(-0.15, 0.15, len(acc)), acc, "o", color="k", ms=3)
    ax.set_xticks(range(len(methods)), [m + f"\n({len(s['failed'])} failed)" * bool(s["failed"])
                                        for m, s in methods.items()], rotation=40, ha="right")
    ax.set(ylabel="held-out exact match", ylim=(0, 1.02), title="one dot per seed, bar = mean")
    save(fig, path)


def plot_sft_curves(curves, path):
    """reproduce_sft.py's curves.json: held-out exact match against SFT step and against training
    forward rows, one line per arm (mean over seeds) with a band of ± 1 std, the y-axis fitted to
    the bands, the legend outside the axes. curves: dict(arms={arm: dict(iters, rows, seeds, mean,
    std)}, note=a line under the title, e.g. a reference that is not drawn)."""
    arms = curves["arms"]
    fig, axes = new_figure(1, 2, figsize=(11, 4), sharey=True)
    lo, hi = 1.0, 0.0
    for i, (arm, c) in enumerate(arms.items()):
        mean, std = np.array(c["mean"]), np.array(c["std"])
        lo, hi = min(lo, (mean - std).min()), max(hi, (mean + std).max())
        for ax, x in zip(axes, (c["iters"], np.array(c["rows"]) / 1000)):
            ax.plot(x, mean, marker="o", ms=3, color=f"C{i}", label=arm)
            ax.fill_between(x, mean - std, mean + std, color=f"C{i}", alpha=0.15, lw=0)
    lo, hi = (lo, hi) if arms else (0.0, 1.0)
    pad = max(0.05 * (hi - lo), 0.01)
    axes[0].set(xlabel="SFT step", ylabel="held-out exact match",
                ylim=(max(0.0, lo - pad), min(1.0, hi + pad)))
    axes[1].set(xlabel="training forward rows (thousands)")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    seeds = sorted({c["seeds"] for c in arms.values()})
    title = f"mean over {'/'.join(map(str, seeds))} seeds, band ± 1 std"
    fig.suptitle(title + (f"; {curves['note']}" if curves.get("note") else ""), fontsize=10)
    save(fig, path)


def read_json(path):
    """A JSON file's content; ValueError naming the file if it cannot be read or parsed."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read as JSON ({type(e).__name__}: {e})") from None


def read_summary(path):
    """A study's summary.json, checked for what plot_results reads; ValueError naming the file."""
    summary = read_json(path)
    methods = summary.get("methods") if isinstance(summary, dict) else None
    if not isinstance(methods, dict) or not methods or not all(
            isinstance(s, dict) and {"acc", "acc_mean", "failed"} <= s.keys()
            for s in methods.values()):
        raise ValueError(f"{path} is not a study's summary.json (no methods with their accuracies)")
    return summary


def main(argv):
    """Regenerate the README's figures (see the module docstring) from a run and a study."""
    cfg = configure(dict(run="out", study="results", sft="results_sft", ckpt="", assets="assets",
                         seed=0), argv)
    ckpt_dir = cfg["ckpt"] or os.path.join(cfg["study"], "runs", "Standard_s0")
    sft = os.path.join(cfg["sft"], "curves.json") if cfg["sft"] else None
    for path in (os.path.join(cfg["run"], "log.jsonl"), os.path.join(cfg["study"], "summary.json"),
                 sft):
        if path and not os.path.isfile(path):
            raise ValueError(f"{path} not found: run `python train.py`, `python -m lab.reproduce` "
                             "and `python -m lab.reproduce_sft` first (--sft= skips the last)")
    summary = read_summary(os.path.join(cfg["study"], "summary.json"))  # all checked first
    sft_curves = read_json(sft) if sft else None
    model, ckpt = load_checkpoint(os.path.join(ckpt_dir, "ckpt.pt"))
    dataset = task_from_checkpoint(ckpt)
    os.makedirs(cfg["assets"], exist_ok=True)
    out = lambda name: os.path.join(cfg["assets"], name)
    plot_run(os.path.join(cfg["run"], "log.jsonl"), cfg["assets"], "python train.py")
    plot_results(summary, out("results.png"))
    curves = {mode: measure_curve(model, dataset, MaskSpec(mode),
                                  generator=torch.Generator().manual_seed(cfg["seed"]))
              for mode in ("standard", "pair", "mirror")}
    plot_components(curves, out("components.png"))
    plot_ppots(PPOTS(curves["standard"]["t"], curves["standard"]["m"].sqrt()), out("ppots.png"))
    if sft:
        plot_sft_curves(sft_curves, out("sft_curves.png"))
    print(f"wrote train.png, variance.png, results.png, components.png, ppots.png"
          f"{', sft_curves.png' * bool(sft)} in {cfg['assets']}")


if __name__ == "__main__":
    report_errors()
    main(sys.argv[1:])
