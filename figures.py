"""The figures of one training run, one PNG each, written by train.py into out_dir:

    plot_training(log_path, path)    train loss, val ELBO and held-out accuracy of one run
    plot_ppots(sampler, path)        measured √m against a P-POTS sampler's density and uniform
    plot_variance(records, path)     A, B, C and their total, of the loss and the gradient
    plot_run(log_path, out_dir)      the end of a run: train.png and variance.png

Importing this module sets no global state (no pyplot, no backend choice): every figure is a
matplotlib Figure made by new_figure and written by save. The study figures, and the command
that regenerates the README's, are in lab/plots.py.
"""
import json
import math
import os

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from samplers import second_moments


def new_figure(nrows=1, ncols=1, figsize=(6, 4), **kw):
    """(fig, axes) as Figure.subplots(nrows, ncols, **kw) gives them, on a Figure of figsize
    inches, attached to no window and no pyplot state."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kw)


def save(fig, path):
    """Lay fig out tightly and write it to path as a PNG at 120 dpi."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_training(log_path, path, title=""):
    """One run's log.jsonl: train loss and val ELBO (bits per token, log scale), and held-out
    exact match for synthetic tasks."""
    records = [json.loads(line) for line in open(log_path)]
    train = [r for r in records if "loss" in r and "variance" not in r]
    evals = [r for r in records if "val_bits" in r]
    fig, (ax1, ax2) = new_figure(1, 2, figsize=(10, 3.5))
    ax1.plot([r["iter"] for r in train], [r["loss"] / math.log(2) for r in train], lw=0.8,
             label="train loss (w·l)")
    ax1.plot([r["iter"] for r in evals], [r["val_bits"] for r in evals], "o-", label="val ELBO")
    ax1.set(xlabel="iter", ylabel="bits / token", yscale="log", title=title)
    ax1.legend()
    if evals and "acc" in evals[0]:
        ax2.plot([r["iter"] for r in evals], [r["acc"] for r in evals], "o-")
        ax2.set(xlabel="iter", ylabel="held-out exact match", ylim=(0, 1))
    save(fig, path)


def plot_ppots(sampler, path):
    """A samplers.PPOTS: the measured √m(t_j) and its extension beyond the grid (scaled as
    a density on the grid), the sampler's density p(t), and uniform; the title gives the predicted
    second moments (samplers.second_moments)."""
    u = torch.linspace(0, 1, 4097, dtype=torch.float64)
    t = sampler.t_grid
    scale = torch.trapezoid(sampler.density(t), t) / torch.trapezoid(sampler.sqrt_m, t)
    fig, ax = new_figure(figsize=(6, 4))
    ax.plot(t, sampler.sqrt_m * scale, "o", ms=3, label="measured √m(t) (as a density)")
    ax.plot(u, sampler.sqrt_m_at(u) * scale, ":", color="gray",
            label="√m extended (1/p law below)")
    ax.plot(u, sampler.density(u), label=f"P-POTS p(t) (fit={sampler.fit}, {sampler.support})")
    ax.axhline(1.0, color="gray", ls="--", label="uniform")
    ours, best = second_moments(sampler)
    ax.set(xlabel="t", ylabel="density", yscale="log",
           title=f"E[(w l)^2] vs uniform x{ours:.3f} (optimum x{best:.3f})")
    ax.legend(fontsize=8)
    save(fig, path)


VARIANCE_LINES = (("A", "A (mask)", "C0"), ("B", "B (rate t)", "C1"), ("C", "C (data x0)", "C2"),
                  ("total", "total A+B+C", "k"))


def plot_variance(records, path):
    """A, B, C and total (A+B+C where a record has no 'total') against the iteration, as lines
    with filled markers on a log y-axis; one panel for the loss, one for the gradient (its
    trace). records: [{'iter': int, 'loss': {'A', 'B', 'C'(, 'total')}, 'grad': {...}}, ...].
    An estimate that came out negative (unbiased estimates can) is an open circle at |value|, an
    exact 0 an open triangle on the panel's bottom edge; both are left out of their line."""
    fig, axes = new_figure(1, 2, figsize=(13, 4.2))
    open_marker = dict(ls="", mfc="none", mew=1.5, ms=7)
    extra = {}
    for ax, key in zip(axes, ("loss", "grad")):
        rs = [r for r in records if r.get(key)]
        it = np.array([r["iter"] for r in rs], dtype=float)
        zeros = []
        for k, label, color in VARIANCE_LINES:
            v = np.array([r[key].get(k, sum(r[key][c] for c in "ABC")) for r in rs], dtype=float)
            style = dict(lw=3, ms=6, alpha=0.4, zorder=1.5) if k == "total" else dict(lw=1.3, ms=4)
            ax.plot(it, np.where(v > 0, v, np.nan), "o-", color=color, label=label, **style)
            ax.plot(it[v < 0], -v[v < 0], marker="o", mec=color, **open_marker)
            zeros += [(it[v == 0], color)] if (v == 0).any() else []
            extra.update({"negative estimate (|value| shown)": "o"} if (v < 0).any() else {})
        ax.set(title=f"{key} variance components", xlabel="iteration", yscale="log",
               ylabel="variance of w·l" if key == "loss" else "trace of gradient covariance")
        ax.grid(True, which="major", alpha=0.3)
        bottom = ax.get_ylim()[0]
        for j, (x, color) in enumerate(zeros):  # nested, so that coinciding ones all show
            ax.plot(x, np.full(len(x), bottom), marker="v", mec=color, clip_on=False,
                    **{**open_marker, "ms": 7 + 4 * j})
            extra["exactly 0 (bottom edge)"] = "v"
        ax.set_ylim(bottom=bottom)
    handles, labels = axes[0].get_legend_handles_labels()
    handles += [Line2D([], [], marker=m, mec="gray", **open_marker) for m in extra.values()]
    axes[1].legend(handles, labels + list(extra), fontsize=8, loc="upper left",
                   bbox_to_anchor=(1.02, 1))  # outside: never over the data
    save(fig, path)


def plot_run(log_path, out_dir, title=""):
    """The end-of-run figures in out_dir: train.png (plot_training) and, if the log has variance
    records, variance.png (plot_variance)."""
    plot_training(log_path, os.path.join(out_dir, "train.png"), title)
    records = [json.loads(line)["variance"] for line in open(log_path) if '"variance"' in line]
    if records:
        plot_variance(records, os.path.join(out_dir, "variance.png"))
