"""The figures of the variance tools, one PNG each; the only place they import matplotlib.

    plot_ppots(sampler, path)        measured √m against a P-POTS sampler's density and uniform
    plot_variance(records, path)     A, B, C of the loss and the gradient over training
    plot_components(curves, path)    per-t components v(t) and g(t)^2 for each masking mode
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import torch  # noqa: E402


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ppots(sampler, path):
    """A samplers.PPOTSSampler: the measured √m(t_j) and its extension beyond the grid (scaled as a
    density on the grid), the sampler's density p(t), and uniform; the title gives the predicted
    second moments (PPOTSSampler.second_moments)."""
    u = torch.linspace(0, 1, 4097, dtype=torch.float64)
    t = sampler.t_grid
    scale = torch.trapezoid(sampler.density(t), t) / torch.trapezoid(sampler.sqrt_m, t)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(t, sampler.sqrt_m * scale, "o", ms=3, label="measured √m(t) (as a density)")
    ax.plot(u, sampler.sqrt_m_at(u) * scale, ":", color="gray", label="√m extended (1/p law below)")
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
