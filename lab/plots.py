"""The lab's figures, one PNG each (the run figures are the root's figures.py):

    plot_components(curves, path)    per-t components v(t) and g(t)^2 for each masking mode
    plot_results(summary, path)      a study's table: one dot per seed, bar = mean
    plot_curves(curves, path, ...)   a study's score against step and forward rows (record.curves)

The README's figures are regenerated from real runs by

    python -m lab.plots --run=out --study=results --sft=results_sft --text=results_text \
                        --assets=assets

with out/ from `python train.py`, results/ from `python -m lab.reproduce` (its Standard seed 0
checkpoint, results/runs/Standard_s0/ckpt.pt, is the model of the per-t and P-POTS figures),
results_sft/ from `python -m lab.reproduce_sft` (its curves.json; --sft= skips sft_curves.png) and
results_text/ from `python -m lab.reproduce_text` (its curves.json; --text= skips
text_curves.png).
"""
import json
import math
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
    """A study's summary.json: one dot per successful seed per method, a bar at the mean (accuracy,
    from 0) or a tick (a val ELBO, on an axis fitted to the dots); failed runs are counted under
    the method's name."""
    methods, metric = summary["methods"], summary["metric"]
    fig, ax = new_figure(figsize=(0.8 * len(methods) + 2, 4))
    for i, s in enumerate(methods.values()):
        values = [v for v in s["values"] if v is not None]
        color = "C7" if s is methods.get("ARM") else "C0"
        if metric["bounded"]:
            ax.bar(i, s["mean"] or 0, color=color, alpha=0.35)
        elif values:
            ax.plot([i - 0.3, i + 0.3], [s["mean"]] * 2, color=color, lw=2)
        ax.plot(i + np.linspace(-0.15, 0.15, len(values)), values, "o", color="k", ms=3)
    ax.set_xticks(range(len(methods)), [m + f"\n({len(s['failed'])} failed)" * bool(s["failed"])
                                        for m, s in methods.items()], rotation=40, ha="right")
    ax.set(ylabel=metric["label"], title="one dot per seed, " + (
        "bar = mean" if metric["bounded"] else "line = mean"))
    if metric["bounded"]:
        ax.set_ylim(0, 1.02)
    save(fig, path)


def plot_curves(curves, path, ylabel="held-out exact match", step_label="SFT step",
                bounded=True):
    """A study's curves (record.curves): the score against the step and against training forward
    rows, one line per arm (mean over seeds) with a band of ± 1 std, the y-axis fitted to the
    bands (within [0, 1] when `bounded`), the legend outside the axes. curves: dict(arms={arm:
    dict(iters, rows, seeds, mean, std)}, note=a line under the title, e.g. a reference that is
    not drawn)."""
    arms = curves["arms"]
    fig, axes = new_figure(1, 2, figsize=(11, 4), sharey=True)
    lo, hi = math.inf, -math.inf
    for i, (arm, c) in enumerate(arms.items()):
        mean, std = np.array(c["mean"]), np.array(c["std"])
        lo, hi = min(lo, (mean - std).min()), max(hi, (mean + std).max())
        for ax, x in zip(axes, (c["iters"], np.array(c["rows"]) / 1000)):
            ax.plot(x, mean, marker="o", ms=3, color=f"C{i}", label=arm)
            ax.fill_between(x, mean - std, mean + std, color=f"C{i}", alpha=0.15, lw=0)
    lo, hi = (lo, hi) if arms else (0.0, 1.0)
    pad = max(0.05 * (hi - lo), 0.01)
    lo, hi = (max(0.0, lo - pad), min(1.0, hi + pad)) if bounded else (lo - pad, hi + pad)
    axes[0].set(xlabel=step_label, ylabel=ylabel, ylim=(lo, hi))
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
            isinstance(s, dict) and {"values", "mean", "failed"} <= s.keys()
            for s in methods.values()) or not isinstance(summary.get("metric"), dict):
        raise ValueError(f"{path} is not a study's summary.json (no metric, or no methods with "
                         f"their values): re-table it with this version's lab")
    return summary


def main(argv):
    """Regenerate the README's figures (see the module docstring) from a run and a study."""
    cfg = configure(dict(run="out", study="results", sft="results_sft", text="results_text",
                         ckpt="", assets="assets", seed=0), argv)
    ckpt_dir = cfg["ckpt"] or os.path.join(cfg["study"], "runs", "Standard_s0")
    sft = os.path.join(cfg["sft"], "curves.json") if cfg["sft"] else None
    text = os.path.join(cfg["text"], "curves.json") if cfg["text"] else None
    for path in (os.path.join(cfg["run"], "log.jsonl"), os.path.join(cfg["study"], "summary.json"),
                 sft, text):
        if path and not os.path.isfile(path):
            raise ValueError(f"{path} not found: run `python train.py`, `python -m lab.reproduce`, "
                             "`python -m lab.reproduce_sft` and `python -m lab.reproduce_text` "
                             "first (--sft= and --text= skip the last two)")
    summary = read_summary(os.path.join(cfg["study"], "summary.json"))  # all checked first
    sft_curves = read_json(sft) if sft else None
    text_curves = read_json(text) if text else None
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
        plot_curves(sft_curves, out("sft_curves.png"))
    if text:
        plot_curves(text_curves, out("text_curves.png"), ylabel="val ELBO (nats/char)",
                    step_label="step", bounded=False)
    print(f"wrote train.png, variance.png, results.png, components.png, ppots.png"
          f"{', sft_curves.png' * bool(sft)}{', text_curves.png' * bool(text)} in {cfg['assets']}")


if __name__ == "__main__":
    report_errors()
    main(sys.argv[1:])
