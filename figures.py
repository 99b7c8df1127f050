"""Every figure of the project, one PNG each; the only module that imports matplotlib.

    plot_training(log_path, path)    train loss, val ELBO and held-out accuracy of one run
    plot_ppots(sampler, path)        measured √m against a P-POTS sampler's density and uniform
    plot_variance(records, path)     A, B, C of the loss and the gradient over training
    plot_components(curves, path)    per-t components v(t) and g(t)^2 for each masking mode
    plot_results(summary, path)      a study's table: one dot per seed, bar = mean
    plot_sft_curves(curves, path)    reproduce_sft.py: accuracy against step and forward rows

The README's figures are regenerated from real runs by

    python figures.py --run=out --study=results --assets=assets

with out/ from `python train.py` and results/ from `python reproduce.py` (its Standard seed 0
checkpoint, results/runs/Standard_s0/ckpt.pt, is the model of the per-t and P-POTS figures).
"""
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
import torch  # noqa: E402


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training(log_path, path, title=""):
    """One run's log.jsonl: train loss and val ELBO (bits per token, log scale), and held-out
    exact match for synthetic tasks."""
    records = [json.loads(line) for line in open(log_path)]
    train = [r for r in records if "loss" in r and "variance" not in r]
    evals = [r for r in records if "val_bits" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot([r["iter"] for r in train], [r["loss"] / math.log(2) for r in train], lw=0.8,
             label="train loss (w·l)")
    ax1.plot([r["iter"] for r in evals], [r["val_bits"] for r in evals], "o-", label="val ELBO")
    ax1.set(xlabel="iter", ylabel="bits / token", yscale="log", title=title)
    ax1.legend()
    if evals and "acc" in evals[0]:
        ax2.plot([r["iter"] for r in evals], [r["acc"] for r in evals], "o-")
        ax2.set(xlabel="iter", ylabel="held-out exact match", ylim=(0, 1))
    _save(fig, path)


def plot_ppots(sampler, path):
    """A samplers.PPOTSSampler: the measured √m(t_j) and its extension beyond the grid (scaled as
    a density on the grid), the sampler's density p(t), and uniform; the title gives the predicted
    second moments (PPOTSSampler.second_moments)."""
    u = torch.linspace(0, 1, 4097, dtype=torch.float64)
    t = sampler.t_grid
    scale = torch.trapezoid(sampler.density(t), t) / torch.trapezoid(sampler.sqrt_m, t)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(t, sampler.sqrt_m * scale, "o", ms=3, label="measured √m(t) (as a density)")
    ax.plot(u, sampler.sqrt_m_at(u) * scale, ":", color="gray",
            label="√m extended (1/p law below)")
    ax.plot(u, sampler.density(u), label=f"P-POTS p(t) (fit={sampler.fit}, {sampler.support})")
    ax.axhline(1.0, color="gray", ls="--", label="uniform")
    ours, best = sampler.second_moments()
    ax.set(xlabel="t", ylabel="density", yscale="log",
           title=f"E[(w l)^2] vs uniform x{ours:.3f} (optimum x{best:.3f})")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_variance(records, path):
    """Stacked A/B/C areas over training iterations, one panel for the loss, one for the gradient.
    records: [{'iter': int, 'loss': {'A', 'B', 'C'}, 'grad': {'A', 'B', 'C'}}, ...]. Estimates that
    came out negative by chance are drawn as 0 (display only: the logged numbers stay unclipped)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("loss", "grad")):
        rs = [r for r in records if r.get(key)]
        ax.stackplot([r["iter"] for r in rs], *([max(r[key][k], 0.0) for r in rs] for k in "ABC"),
                     labels=["A (mask)", "B (rate t)", "C (data x0)"], alpha=0.8)
        ax.set(title=f"{key} variance components", xlabel="iteration")
        ax.legend(loc="upper right")
    _save(fig, path)


def plot_components(curves, path):
    """Per-t components from samplers.measure_curve, one line per masking mode (curves: {mode:
    dict(t, m, g, v)}, e.g. standard, pair, mirror): v(t) = E_x0 Var(l | x0, t), the integrand of
    A over uniform t, and g(t)^2 = (E[l | t])^2, both on a log scale."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for mode, curve in curves.items():
        axes[0].plot(curve["t"], curve["v"], label=mode)
        axes[1].plot(curve["t"], curve["g"] ** 2, label=mode)
    axes[0].set(xlabel="t", yscale="log", title="v(t) = E Var(l | x0, t): the per-t A")
    axes[1].set(xlabel="t", yscale="log", title="g(t)^2 = E[l | t]^2")
    axes[0].legend()
    _save(fig, path)


def plot_results(summary, path):
    """reproduce.py's summary.json: one dot per successful seed per method, a bar at the mean;
    failed runs are counted under the method's name."""
    methods = summary["methods"]
    fig, ax = plt.subplots(figsize=(0.8 * len(methods) + 2, 4))
    for i, s in enumerate(methods.values()):
        acc = [a for a in s["acc"] if a is not None]
        ax.bar(i, s["acc_mean"] or 0, color="C7" if s is methods.get("ARM") else "C0", alpha=0.35)
        ax.plot(i + np.linspace(-0.15, 0.15, len(acc)), acc, "o", color="k", ms=3)
    ax.set_xticks(range(len(methods)), [m + f"\n({len(s['failed'])} failed)" * bool(s["failed"])
                                        for m, s in methods.items()], rotation=40, ha="right")
    ax.set(ylabel="held-out exact match", ylim=(0, 1.02), title="one dot per seed, bar = mean")
    _save(fig, path)


def plot_sft_curves(curves, path):
    """reproduce_sft.py: held-out exact match against SFT step and against training forward rows,
    one line per arm (mean over seeds) with a band of ± 1 std. curves: arm -> dict(iters, rows,
    mean, std)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
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
    _save(fig, path)


def main(argv):
    """Regenerate the README's figures (see the module docstring) from a run and a study."""
    from checkpoint import load_checkpoint
    from configurator import configure
    from data import task_from_checkpoint
    from masking import MaskSpec
    from samplers import PPOTSSampler, measure_curve
    cfg = configure(dict(run="out", study="results", ckpt="", assets="assets", seed=0), argv)
    ckpt_dir = cfg["ckpt"] or os.path.join(cfg["study"], "runs", "Standard_s0")
    for path in (os.path.join(cfg["run"], "log.jsonl"), os.path.join(cfg["study"], "summary.json")):
        if not os.path.isfile(path):
            raise ValueError(f"{path} not found: "
                             "run `python train.py` and `python reproduce.py` first")
    os.makedirs(cfg["assets"], exist_ok=True)
    out = lambda name: os.path.join(cfg["assets"], name)
    plot_training(os.path.join(cfg["run"], "log.jsonl"), out("train.png"), "python train.py")
    plot_results(json.load(open(os.path.join(cfg["study"], "summary.json"))), out("results.png"))
    model, ckpt = load_checkpoint(os.path.join(ckpt_dir, "ckpt.pt"))
    task = task_from_checkpoint(ckpt)
    curves = {mode: measure_curve(model, task, MaskSpec(mode),
                                  generator=torch.Generator().manual_seed(cfg["seed"]))
              for mode in ("standard", "pair", "mirror")}
    plot_components(curves, out("components.png"))
    plot_ppots(PPOTSSampler(curves["standard"]["t"], curves["standard"]["m"].sqrt()),
               out("ppots.png"))
    print(f"wrote train.png, results.png, components.png and ppots.png in {cfg['assets']}")


if __name__ == "__main__":
    from configurator import report_errors
    report_errors()
    main(sys.argv[1:])
