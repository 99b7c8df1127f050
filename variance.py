"""Where the variance of MDM training comes from: the paper's three-way decomposition (Eq. 2).

One training draw is  l = w(t) * mdm_loss(x0, t, mask)  for a clean x0, a masking rate t (with its
importance weight w from the t-sampler) and a random mask. With g(x0, t) = E[l | x0, t], the law of
total variance splits Var l into

    A = E_{x0,t} Var(l | x0, t)       mask-pattern noise      (MIRROR / pair masking attack this)
    B = E_{x0} Var_t g(x0, t)         masking-rate noise      (P-POTS; StraTS across a batch)
    C = Var_{x0} E_t g(x0, t)         data noise              (what an ARM has too)

measure() draws a x0 x b rates x c masks with the same sampler -> masking -> model -> mdm_loss calls
train.py makes, and decompose() turns the [a, b, c] losses into unbiased estimates of A, B, C. With
target='grad' the same is done for the per-draw gradients (projected on a few random directions):
that is the noise the optimiser actually feels. Standalone:

    python variance.py --out_dir=out [--n_x0=64 --n_t=16 --n_masks=4 --device=cpu --seed=0]
"""
import math
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from configurator import configure, report_errors
from data import task_from_config
from masking import MODES, MaskSpec, row_losses
from checkpoint import load_checkpoint

PROJ_SEED = 0  # the random projection directions of target='grad' are the same in every call


def _plug_in(L):
    """Plug-in (ddof = 0) components per trailing coordinate, tensors [d], and the sizes (a, b, c)."""
    L = L.double()
    if L.dim() == 3:
        L = L[..., None]
    a, b, c, _ = L.shape
    if min(a, b, c) < 2:
        raise ValueError(f"decompose needs >= 2 x0s, rates and masks; got a, b, c = {a, b, c}")
    shift = L[:, :1, :1]  # centre each x0 on one of its own draws: identical values give exact zeros
    cell = (L - shift).mean(2)  # g(x0, t) estimate, [a, b, d]
    A0 = (L - shift).var(2, unbiased=False).mean((0, 1))
    B0 = cell.var(1, unbiased=False).mean(0)
    C0 = (cell.mean(1) + shift[:, 0, 0]).var(0, unbiased=False)
    return A0, B0, C0, (a, b, c)


def naive_decompose(L):
    """Plug-in A, B, C (within-cell, over-t, over-x0 variances of the sample means, no corrections).
    They add up to the plug-in variance of all draws, but B and C are biased up by the noise of
    the means they are computed from (B by A/c, C by B/b + A/(bc)) and down by the 1/n of ddof = 0."""
    A0, B0, C0, _ = _plug_in(L)
    A, B, C = A0.sum().item(), B0.sum().item(), C0.sum().item()
    return dict(A=A, B=B, C=C, total=A + B + C)


def decompose(L):
    """Unbiased A, B, C from losses L[a, b, c] (a x0s, b rates t per x0, c masks per (x0, t)).

    Random-effects ANOVA: l_ijk = g_ij + e_ijk with Var e = A, and g_ij = G_i + b_ij with Var b = B,
    Var G = C. Writing l_ij. and l_i.. for the means over masks and over (t, masks):

        A = mean_ij  s2_k(l_ijk)                    E = A                     (unbiased s2 over k)
        S = mean_i   s2_j(l_ij.),   B = S - A/c     E[S] = B + A/c            (unbiased s2 over j)
        C = s2_i(l_i..) - S/b                       E[s2_i] = C + B/b + A/(bc) = C + E[S]/b

    so each estimate is unbiased and total = A + B + C estimates Var l. B and C can come out slightly
    negative by chance; they are not clipped, because clipping at 0 would bias them upwards.
    L[a, b, c, d] (d coordinates of a vector, e.g. projected gradients) gives the traces: each
    component summed over d. An ARM's loss is a deterministic function of x0 (no t, no mask), so
    for it A = B = 0 exactly and all its variance is C.
    """
    A0, B0, C0, (a, b, c) = _plug_in(L)
    A = A0 * c / (c - 1)
    S = B0 * b / (b - 1)
    B, C = S - A / c, C0 * a / (a - 1) - S / b
    A, B, C = A.sum().item(), B.sum().item(), C.sum().item()
    return dict(A=A, B=B, C=C, total=A + B + C)


def _rates(sampler, n, generator, causal):
    """(t, w) for n rows from ONE sampler call (so a stratified sampler stratifies those n rows).
    An ARM has no masking rate: t = 0, w = 1."""
    if causal:
        return torch.zeros(n), torch.ones(n)
    return sampler.sample(n, generator)


def _with_params(model, params):
    """`model` run with the parameter tensors `params` (for forward-mode AD), as row_losses calls it."""
    def forward(idx):
        return torch.func.functional_call(model, params, (idx,))
    forward.config = model.config
    return forward


def _draws(model, x0, eligible, t, w, masking, seed, max_rows, directions=None):
    """l * w for every row: FloatTensor[R]. Rows go in chunks of max_rows; chunk i draws its masks
    from a generator seeded seed + i, so every pass over the rows sees the same masks.
    With `directions` (n_proj parameter dicts u): FloatTensor[R, n_proj] of <grad(l * w), u> per
    row, each by one forward-mode pass (jvp gives J u for all rows at once; no per-row gradient is
    ever stored). Forward AD needs the math attention kernel."""
    params = {k: p.detach() for k, p in model.named_parameters()} if directions else None
    out = []
    for i, start in enumerate(range(0, len(x0), max_rows)):
        rows = slice(start, start + max_rows)

        def loss(m):
            gen = torch.Generator(x0.device).manual_seed(seed + i)
            return row_losses(m, x0[rows], eligible[rows], t[rows], masking, gen) * w[rows]
        if directions is None:
            out.append(loss(model))
            continue
        with sdpa_kernel(SDPBackend.MATH):
            proj = [torch.func.jvp(lambda p: loss(_with_params(model, p)), (params,), (u,))[1]
                    for u in directions]
        out.append(torch.stack(proj, 1))
    return torch.cat(out)


def _directions(model, n_proj):
    """n_proj random unit vectors of the full parameter space (Gaussian, normalised over all D
    coordinates), as parameter dicts; the same for every call (PROJ_SEED)."""
    gen = torch.Generator().manual_seed(PROJ_SEED)
    params = dict(model.named_parameters())
    dirs = []
    for _ in range(n_proj):
        u = {k: torch.randn(p.shape, generator=gen) for k, p in params.items()}
        norm = math.sqrt(sum(v.square().sum().item() for v in u.values()))
        dirs.append({k: (v / norm).to(params[k]) for k, v in u.items()})
    return dirs


@torch.no_grad()
def measure(model, task, sampler, masking=MaskSpec(), n_x0=32, n_t=8, n_masks=4, target="loss",
            generator=None, batch_size=None, n_batches=32, n_proj=8, max_rows=1024):
    """A, B, C of the training draw l * w (target='loss') or of its gradient (target='grad').

    n_x0 train x0s; for each, n_t rates (t, w) from one sampler.sample(n_t) call; for each (x0, t),
    n_masks mask draws (mirror/pair: one draw = one pair-averaged loss, as in training). The model
    runs in eval mode (training flag restored). A fixed (CPU) generator gives identical results;
    masks come from device generators seeded from it. max_rows: x0 rows per forward pass (mirror
    and pair run twice that).

    target='grad': the per-draw gradient of l * w is projected on n_proj fixed random unit
    directions u of the D-dim parameter space and decomposed per direction ([a, b, c, n_proj]).
    Since E_u[(u.v)^2] = |v|^2 / D, the summed components are rescaled by D / n_proj: A, B, C are
    then (noisy but unbiased) estimates of the full traces, e.g. A ~ E tr Cov(grad | x0, t).

    target='loss' also gives batch_var: the variance of the batch-mean loss the optimiser sees, for
    batches of batch_size (default n_x0) fresh x0s, t from ONE sampler call per batch (so StraTS
    shows), one mask each; unbiased over n_batches batches. The per-draw A, B, C cannot show StraTS.
    """
    if target not in ("loss", "grad"):
        raise ValueError(f"unknown target {target!r}; use 'loss' or 'grad'")
    was_training, device, causal = model.training, model.lm_head.weight.device, model.config.causal
    model.eval()
    try:
        x0, eligible = (z.to(device) for z in task.batch(n_x0, "train", generator))
        b, c = (1, 1) if causal else (n_t, n_masks)  # an ARM's l depends on x0 only: evaluate once
        t, w = (torch.stack(z).to(device).repeat_interleave(c, 1).flatten()
                for z in zip(*(_rates(sampler, b, generator, causal) for _ in range(n_x0))))
        seed = int(torch.randint(2**62, (), generator=generator))
        directions = _directions(model, n_proj) if target == "grad" else None
        vals = _draws(model, x0.repeat_interleave(b * c, 0), eligible.repeat_interleave(b * c, 0),
                      t, w, masking, seed, max_rows, directions)
        L = vals.view(n_x0, b, c, *vals.shape[1:]).expand(n_x0, n_t, n_masks, *vals.shape[1:])
        res = decompose(L)
        if target == "grad":
            D = sum(p.numel() for p in model.parameters())
            res = {k: v * D / n_proj for k, v in res.items()}
            res.update(n_proj=n_proj, n_params=D)
        else:
            res["mean"] = L.double().mean().item()
            res["batch_var"] = _batch_var(model, task, sampler, masking, batch_size or n_x0,
                                          n_batches, generator, max_rows)
    finally:
        model.train(was_training)
    res.update(target=target, masking=str(masking), n_x0=n_x0, n_t=n_t, n_masks=n_masks)
    return res


def _batch_var(model, task, sampler, masking, batch_size, n_batches, generator, max_rows):
    """Unbiased variance of the batch mean of l * w over n_batches independent training batches."""
    device, causal = model.lm_head.weight.device, model.config.causal
    batches = [task.batch(batch_size, "train", generator) + _rates(sampler, batch_size, generator, causal)
               for _ in range(n_batches)]
    x0, eligible, t, w = (torch.cat(z).to(device) for z in zip(*batches))
    seed = int(torch.randint(2**62, (), generator=generator))
    vals = _draws(model, x0, eligible, t, w, masking, seed, max_rows)
    return vals.double().view(n_batches, batch_size).mean(1).var().item()


def format_line(iter_num, loss_res, grad_res=None):
    """One log line: 'iter 400 | loss A 0.412 B 0.0513 C 0.00712 | grad A ... B ... C ...'."""
    parts = [f"iter {iter_num}"]
    for name, res in (("loss", loss_res), ("grad", grad_res)):
        if res is not None:
            parts.append(f"{name} " + " ".join(f"{k} {res[k]:.3g}" for k in "ABC"))
    return " | ".join(parts)


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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    """Table of A, B, C, total, batch_var for every t-sampler x masking on one checkpoint."""
    import samplers  # the t-laws; only the standalone needs them (train.py passes its own sampler)
    cfg = configure(dict(out_dir="out", n_x0=64, n_t=16, n_masks=4, n_batches=64, device="cpu", seed=0), argv)
    model, ckpt = load_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"), cfg["device"])
    task = task_from_config(ckpt["config"])
    kw = dict(n_x0=cfg["n_x0"], n_t=cfg["n_t"], n_masks=cfg["n_masks"], n_batches=cfg["n_batches"])
    rows = lambda m: ckpt["config"]["batch_size"] // (  # train.py's x0 rows per step (matched_compute)
        2 if m in ("mirror", "pair") and ckpt["config"].get("matched_compute") else 1)
    gen = lambda: torch.Generator().manual_seed(cfg["seed"])  # same data for every row of the table
    print(f"{'sampler':>10} {'masking':>8} {'A':>10} {'B':>10} {'C':>10} {'total':>10} {'batch_var':>10}")
    row = lambda s, m, r: print(f"{s:>10} {m:>8} " + " ".join(f"{r[k]:10.4g}" for k in
                                                              ("A", "B", "C", "total", "batch_var")))
    if ckpt["model_args"].get("causal"):
        row("ARM", "-", measure(model, task, None, generator=gen(), batch_size=rows("standard"), **kw))
        return
    res, curves = {}, {}
    for s, m in tqdm([(s, m) for m in MODES for s in ("uniform", "stratified", "ppots")], desc="variance"):
        if s == "ppots":  # fitted once per masking, on the same weights
            curves[m] = samplers.measure_curve(model, task, MaskSpec(m), generator=gen())
            sampler = samplers.PPOTSSampler(curves[m]["t"], curves[m]["m"].sqrt())  # = build_ppots, curve kept
        else:
            sampler = samplers.make_sampler(s)
        res[s, m] = measure(model, task, sampler, MaskSpec(m), generator=gen(), batch_size=rows(m), **kw)
    for (s, m), r in res.items():
        row(s, m, r)
    for s in ("uniform", "stratified", "ppots"):
        ratio = lambda m: res[s, m]["A"] / res[s, "standard"]["A"]
        print(f"MIRROR {s:>10}: A_mirror / A_standard = {ratio('mirror'):.3f}  (pair {ratio('pair'):.3f}; "
              f"theory: mirror <= 1/2, pair = 1/2)")
    for m, cv in curves.items():  # p ~ sqrt(m), w = 1/p minimises E[(l w)^2] to (int sqrt m)^2
        floor = (torch.trapezoid(cv["m"].sqrt(), cv["t"]) ** 2 - torch.trapezoid(cv["g"], cv["t"]) ** 2).item()
        r = res["ppots", m]  # any unbiased t-law has E_t[l w | x0] = int g(x0, t) dt: C is fixed, so
        # the floor on A+B is floor - C
        print(f"P-POTS {m:>8}: theory min (int sqrt m)^2 - (int g)^2 = {floor:.4g} of A+B+C, so A+B >= "
              f"{floor - r['C']:.4g} | measured A+B = {r['A'] + r['B']:.4g}, A+B+C = {r['total']:.4g}")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for m, cv in curves.items():
        axes[0].plot(cv["t"], cv["g"], label=m)
        axes[1].plot(cv["t"], cv["v"], label=m)
    axes[0].set(xlabel="t", title="g(t) = E[l | t]")
    axes[1].set(xlabel="t", title="v(t) = Var(l | t, x0): the per-t A integrand", yscale="log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(cfg["out_dir"], "components_vs_t.png"), dpi=120)
    print(f"wrote {os.path.join(cfg['out_dir'], 'components_vs_t.png')}")


if __name__ == "__main__":
    report_errors()
    main(sys.argv[1:])
