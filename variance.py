"""Where the variance of MDM training comes from: the paper's three-way decomposition (Eq. 2).

One training draw is l = w(t) * mdm_loss(x0, t, mask) for a clean x0, a masking rate t (weight w
from the t-sampler) and a random mask. With g(x0, t) = E[l | x0, t], the law of total variance
splits Var l into

    A = E_{x0,t} Var(l | x0, t)       mask-pattern noise      (MIRROR / pair masking attack this)
    B = E_{x0} Var_t g(x0, t)         masking-rate noise      (P-POTS; StraTS across a batch)
    C = Var_{x0} E_t g(x0, t)         data noise              (what an ARM has too)

measure() draws a x0 x b rates x c masks through train.py's own calls and decompose() turns the
[a, b, c] losses (or projected gradients, target='grad') into unbiased A, B, C; train.py prints
them with format_line every variance_interval steps. Intervals (a bootstrap over x0) and the
standalone table for every t-sampler x masking on one checkpoint are the lab's:

    python -m lab.variance_table --out_dir=out
"""
import math

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from masking import MaskSpec, row_losses

PROJ_SEED = 0  # the random projection directions of target='grad' are the same in every call


def x0_summary(L):
    """decompose()'s per-x0 pieces of L[a, b, c(, d)], numpy float64 [a, d]: within (ddof = 0
    variance over masks, averaged over t), between (variance over t of the cell means) and mean,
    with b and c. Resampling x0 rows of these is resampling x0 rows of L."""
    L = torch.as_tensor(L).detach().double().cpu()
    if L.dim() == 3:
        L = L[..., None]
    a, b, c, _ = L.shape
    if min(a, b, c) < 2:
        raise ValueError(f"decompose needs >= 2 x0s, rates and masks; got a, b, c = {a, b, c}")
    shift = L[:, :1, :1]  # centre each x0 on one of its own draws: equal values give exact zeros
    cell = (L - shift).mean(2)  # g(x0, t) estimate, [a, b, d]
    return dict(within=(L - shift).var(2, unbiased=False).mean(1).numpy(),
                between=cell.var(1, unbiased=False).numpy(),
                mean=(cell.mean(1) + shift[:, 0, 0]).numpy(), b=b, c=c)


def components(summary, idx=None):
    """decompose()'s unbiased A, B, C, total from an x0_summary, on the x0 rows idx (default: all;
    a bootstrap resample repeats some)."""
    idx = np.arange(len(summary["mean"])) if idx is None else idx
    a, b, c = len(idx), summary["b"], summary["c"]
    A = summary["within"][idx].mean(0) * c / (c - 1)
    S = summary["between"][idx].mean(0) * b / (b - 1)
    B, C = S - A / c, summary["mean"][idx].var(0) * a / (a - 1) - S / b
    A, B, C = float(A.sum()), float(B.sum()), float(C.sum())
    return dict(A=A, B=B, C=C, total=A + B + C)


def naive_decompose(L):
    """Plug-in A, B, C (ddof = 0 variances within cells, over t, over x0): they add up to the
    plug-in Var of all draws, but B and C are biased up by the noise of their means (B by A/c, C by
    B/b + A/(bc)) and down by ddof = 0."""
    s = x0_summary(L)
    A, B, C = (float(z.sum())
               for z in (s["within"].mean(0), s["between"].mean(0), s["mean"].var(0)))
    return dict(A=A, B=B, C=C, total=A + B + C)


def decompose(L):
    """Unbiased A, B, C, total from losses L[a, b, c] (a x0s, b i.i.d. rates per x0, c masks per
    (x0, t)); L[a, b, c, d] (d coordinates, e.g. projected gradients) gives the traces, summed
    over d. With unbiased sample variances s2 and l_ij., l_i.. the means over masks and (t, masks):

        A = mean_ij s2_k(l_ijk),   S = mean_i s2_j(l_ij.),   B = S - A/c,   C = s2_i(l_i..) - S/b

    (random-effects ANOVA: docs/variance.md, "The estimators"). B and C can come out slightly
    negative by chance and are not clipped (clipping would bias them up)."""
    return components(x0_summary(L))


def draw_rates(sampler, n_x0, n_t, generator=None):
    """(t, w), FloatTensor[n_x0, n_t] each, all i.i.d. from one row's law (sampler.marginal), as
    decompose needs: one stratified sample(n_t) per x0 would spread them evenly, inflating B and
    deflating C. StraTS couples a batch's rows; measure's batch_var shows that."""
    t, w = sampler.marginal(n_x0 * n_t, generator)
    return t.view(n_x0, n_t), w.view(n_x0, n_t)


def _with_params(model, params):
    """`model` run with the parameter tensors `params` (for forward-mode AD), callable as
    row_losses calls a model."""
    def forward(idx):
        return torch.func.functional_call(model, params, (idx,))
    forward.config = model.config
    return forward


def _draws(model, x0, eligible, t, w, spec, seed, max_rows, directions=None):
    """l * w per row, FloatTensor[R]; chunk i of max_rows rows draws its masks from seed + i, so
    every pass sees the same masks. With `directions` (n_proj parameter dicts u): [R, n_proj] of
    <grad(l * w), u>, one forward-mode jvp per u for all rows (no per-row gradient is stored;
    forward AD needs the math attention kernel)."""
    params = {k: p.detach() for k, p in model.named_parameters()} if directions else None
    out = []
    for i, start in enumerate(range(0, len(x0), max_rows)):
        rows = slice(start, start + max_rows)

        def loss(m):
            gen = torch.Generator(x0.device).manual_seed(seed + i)
            return row_losses(m, x0[rows], eligible[rows], t[rows], spec, gen) * w[rows]
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
def measure(model, dataset, sampler, spec=MaskSpec(), n_x0=32, n_t=8, n_masks=4, target="loss",
            generator=None, batch_size=None, n_batches=32, n_proj=8, max_rows=1024,
            keep_draws=False):
    """A, B, C of the training draw l * w (target='loss') or of its gradient (target='grad'), from
    n_x0 train x0s x n_t rates (draw_rates) x n_masks masks (mirror/pair: one draw = one
    pair-averaged loss, as in training), in eval mode (training flag restored). A fixed CPU
    generator gives identical results and, drawn first, the same x0s for the same n_x0; masks
    come from device generators seeded from it. max_rows: x0 rows per forward pass.

    'grad' projects each draw's gradient on n_proj fixed random unit directions u of the D
    parameters; E_u[(u.v)^2] = |v|^2 / D, so scaling by D / n_proj makes A, B, C unbiased
    estimates of the full traces. 'loss' also gives batch_var, the unbiased variance over
    n_batches of a training batch's mean (batch_size fresh x0s, default n_x0, t from ONE
    sampler.sample call: where StraTS shows). keep_draws: res['draws'], float64 [n_x0, n_t,
    n_masks(, n_proj)] ('grad': scaled by √(D / n_proj)), so decompose(res['draws']) is res.
    """
    if target not in ("loss", "grad"):
        raise ValueError(f"unknown target {target!r}; use 'loss' or 'grad'")
    was_training, device, causal = model.training, model.lm_head.weight.device, model.config.causal
    model.eval()
    try:
        x0, eligible = (z.to(device) for z in dataset.batch(n_x0, "train", generator))
        b, c = (1, 1) if causal else (n_t, n_masks)  # an ARM's l depends on x0 only: evaluate once
        t, w = ((torch.zeros(n_x0, 1), torch.ones(n_x0, 1)) if causal
                else draw_rates(sampler, n_x0, n_t, generator))
        t, w = (z.to(device).repeat_interleave(c, 1).flatten() for z in (t, w))
        seed = int(torch.randint(2**62, (), generator=generator))
        directions = _directions(model, n_proj) if target == "grad" else None
        vals = _draws(model, x0.repeat_interleave(b * c, 0), eligible.repeat_interleave(b * c, 0),
                      t, w, spec, seed, max_rows, directions)
        L = vals.double().view(n_x0, b, c, *vals.shape[1:]).expand(n_x0, n_t, n_masks,
                                                                   *vals.shape[1:])
        if target == "grad":
            D = sum(p.numel() for p in model.parameters())
            L = L * math.sqrt(D / n_proj)  # squared in every component: the trace estimates
        res = decompose(L)
        if target == "grad":
            res.update(n_proj=n_proj, n_params=D)
        else:
            res["mean"] = L.mean().item()
            res["batch_var"] = _batch_var(model, dataset, sampler, spec, batch_size or n_x0,
                                          n_batches, generator, max_rows)
    finally:
        model.train(was_training)
    res.update(target=target, masking=str(spec), n_x0=n_x0, n_t=n_t, n_masks=n_masks)
    if keep_draws:
        res["draws"] = L.cpu()
    return res


def _batch_var(model, dataset, sampler, spec, batch_size, n_batches, generator, max_rows):
    """Unbiased variance of the batch mean of l * w over n_batches independent training batches,
    each with its t's from one sampler.sample(batch_size) call, as train.py draws them."""
    device, causal = model.lm_head.weight.device, model.config.causal
    batches = []
    for _ in range(n_batches):
        x0, eligible = dataset.batch(batch_size, "train", generator)
        t, w = ((torch.zeros(batch_size), torch.ones(batch_size)) if causal
                else sampler.sample(batch_size, generator))
        batches.append((x0, eligible, t, w))
    x0, eligible, t, w = (torch.cat(z).to(device) for z in zip(*batches))
    seed = int(torch.randint(2**62, (), generator=generator))
    vals = _draws(model, x0, eligible, t, w, spec, seed, max_rows)
    return vals.double().view(n_batches, batch_size).mean(1).var().item()


def format_line(iter_num, loss_res, grad_res=None):
    """One log line: 'iter 400 | loss A 0.412 B 0.0513 C 0.00712 | grad A ... B ... C ...'."""
    parts = [f"iter {iter_num}"]
    for name, res in (("loss", loss_res), ("grad", grad_res)):
        if res is not None:
            parts.append(f"{name} " + " ".join(f"{k} {res[k]:.3g}" for k in "ABC"))
    return " | ".join(parts)
