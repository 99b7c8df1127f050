"""The lab's figures, one PNG each (the run figures are the root's figures.py):

    plot_components(curves, path)    per-t components v(t) and g(t)^2 for each masking mode
    plot_results(summary, path)      a study's table: one dot per seed, bar = mean
    plot_sft_curves(curves, path)    lab/reproduce_sft.py: accuracy against step and forward rows

The README's figures are regenerated from real runs by

    python -m lab.plots --run=out --study=results --assets=assets

with out/ from `python train.py` and results/ from `python -m lab.reproduce` (its Standard seed 0
checkpoint, results/runs/Standard_s0/ckpt.pt, is the model of the per-t and P-POTS figures).
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
    """reproduce_sft.py: held-out exact match against SFT step and against training forward rows,
    one line per arm (mean over seeds) with a band of ± 1 std. curves: arm -> dict(iters, rows,
    mean, std)."""
    fig, axes = new_figure(1, 2, figsize=(11, 4), sharey=True)
    for i, (arm, c) in enumerate(curves.items()):
        mean, std = np.array(c["mean"]), np.array(c["std"])
        for ax, x in zip(axes, (c["iters"], c["rows"])):
            ax.plot(x, mean, marker="o", ms=3, color=f"C{i % 10}", ls="--" if i >= 10 else "-",
                    label=arm)
            ax.fill_between(x, mean - std, mean + std, color=f"C{i % 10}", alpha=0.12)
    axes[0].set(xlabel="SFT step", ylabel="held-out exact match", ylim=(0, 1.02))
    axes[1].set(xlabel="training forward rows")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("mean over seeds, band ± 1 std")
    save(fig, path)


def main(argv):
    """Regenerate the README's figures (see the module docstring) from a run and a study."""
    cfg = configure(dict(run="out", study="results", ckpt="", assets="assets", seed=0), argv)
    ckpt_dir = cfg["ckpt"] or os.path.join(cfg["study"], "runs", "Standard_s0")
    for path in (os.path.join(cfg["run"], "log.jsonl"), os.path.join(cfg["study"], "summary.json")):
        if not os.path.isfile(path):
            raise ValueError(f"{path} not found: "
                             "run `python train.py` and `python -m lab.reproduce` first")
    os.makedirs(cfg["assets"], exist_ok=True)
    out = lambda name: os.path.join(cfg["assets"], name)
    plot_run(os.path.join(cfg["run"], "log.jsonl"), cfg["assets"], "python train.py")
    plot_results(json.load(open(os.path.join(cfg["study"], "summary.json"))), out("results.png"))
    model, ckpt = load_checkpoint(os.path.join(ckpt_dir, "ckpt.pt"))
    dataset = task_from_checkpoint(ckpt)
    curves = {mode: measure_curve(model, dataset, MaskSpec(mode),
                                  generator=torch.Generator().manual_seed(cfg["seed"]))
              for mode in ("standard", "pair", "mirror")}
    plot_components(curves, out("components.png"))
    plot_ppots(PPOTS(curves["standard"]["t"], curves["standard"]["m"].sqrt()), out("ppots.png"))
    print(f"wrote train.png, variance.png, results.png, components.png and ppots.png in "
          f"{cfg['assets']}")


if __name__ == "__main__":
    report_errors()
    main(sys.argv[1:])
