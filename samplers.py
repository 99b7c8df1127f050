"""Masking-rate (t) samplers for MDM training: uniform, stratified (StraTS), clipped and P-POTS.

The MDM loss is L = int_0^1 E[l | t] dt (l = masking.row_losses). A sampler draws t_1..t_n with
weights w_i and train.py minimises mean_i w_i l(t_i): unbiased when E[w f(t)] = int_0^1 f(t) dt
for every f, i.e. when the weighted loss estimates L itself.

    sampler = make_sampler("stratified")          # P-POTS: build_ppots(model, dataset, spec)
    t, w = sampler.sample(batch_size, generator)  # FloatTensor[n] each, CPU
    loss = (w * row_losses(model, x0, eligible, t.to(device), spec)).mean()

Top to bottom: the interface, the three simple t-laws, P-POTS in the order it runs (derivations:
docs/variance.md, "P-POTS"), construction. Behind the seam: online refits and diagnostics, which
use the core and are never used by it.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from masking import MaskSpec, draw_masks, mask_rate, row_losses

CELLS = 4096  # P-POTS tabulates p on 4096 equal cells of its support
TAIL_T = 0.3  # the 1/p law of m below the grid is fitted on the grid points with t <= TAIL_T
EPR_NAMES = ("a", "b", "c", "kappa", "r", "q", "n")  # epr_log_density's parameters
SAMPLERS = ("uniform", "stratified", "clipped", "ppots")  # the t-laws, by name


class Sampler:
    """sample(n, generator) -> (t, w): one training batch's draws. The state is `name` plus the
    attributes in `keys` (python values and tensors, so a weights_only checkpoint can hold it);
    from_state(state_dict()) is a sampler that draws identically."""
    name, keys = None, ()

    @classmethod
    def from_state(cls, sd):
        """The sampler whose state_dict() is sd; here the keys are the constructor's arguments."""
        return cls(**{k: sd[k] for k in cls.keys})

    def marginal(self, n, generator=None):
        """n i.i.d. draws from ONE row's law: sample(n) where one call's draws are independent."""
        return self.sample(n, generator)

    def state_dict(self):
        return {"name": self.name, **{k: getattr(self, k) for k in self.keys}}


class UniformSampler(Sampler):
    """t ~ U(0, 1), w = 1: the standard MDM estimator (unbiased)."""
    name = "uniform"

    def sample(self, n, generator=None):
        return torch.rand(n, generator=generator), torch.ones(n)


class StratifiedSampler(Sampler):
    """StraTS: k equal strata of [0, 1] (None: k = ceil(√n)), n // k uniform draws in each and the
    n % k left over in distinct random strata (each expects n/k draws: unbiased), shuffled; w = 1.
    Each row's t is U(0, 1), but one call's draws are dependent: marginal() is the i.i.d. law."""
    name, keys = "stratified", ("k",)

    def __init__(self, k=None):
        self.k = k

    def sample(self, n, generator=None):
        k = self.k or math.ceil(math.sqrt(n))
        per, extra = divmod(n, k)
        strata = torch.cat([torch.arange(k).repeat(per),
                            torch.randperm(k, generator=generator)[:extra]])
        t = (strata + torch.rand(n, generator=generator)) / k
        return t[torch.randperm(n, generator=generator)], torch.ones(n)

    def marginal(self, n, generator=None):
        """One row's law: t ~ U(0, 1), w = 1, i.i.d."""
        return torch.rand(n, generator=generator), torch.ones(n)


class ClippedSampler(Sampler):
    """The "Clipped" baseline of the paper's Table 1: t ~ U(lo, hi), w = 1. BIASED: it estimates
    (1/(hi - lo)) int_lo^hi E[l | t] dt, skipping the noisiest t < lo and the near-blind t > hi.
    Lower variance, different objective. lo = 0.1, hi = 0.9 (10 % off each end) are our choice."""
    name, keys = "clipped", ("lo", "hi")

    def __init__(self, lo=0.1, hi=0.9):
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"clipped sampler needs 0 <= lo < hi <= 1, got lo={lo}, hi={hi}")
        self.lo, self.hi = lo, hi

    def sample(self, n, generator=None):
        return self.lo + (self.hi - self.lo) * torch.rand(n, generator=generator), torch.ones(n)


# ----------------------------------------------------------------------------- P-POTS
# measure_curve -> tail_coefficients -> fit_epr -> PPOTS: tabulate, sample, weight; build_ppots.
@torch.no_grad()
def measure_curve(model, dataset, spec=MaskSpec(), T=70, n_x0=32, n_masks=4, generator=None,
                  batch_rows=2048, forward_rows=512, keep_draws=False):
    """m(t_j) = E[l^2 | t_j] on t_j = linspace(1/T, 1 - 1/T, T - 1) from n_x0 training examples x
    n_masks masks of spec, in eval mode: dict(t, m, g, v), float32[T - 1], m the mean of l^2
    (docs/variance.md, "The measured m"), g, v the per-x0 mean and variance over masks averaged
    over x0; keep_draws adds draws[n_x0, T - 1, n_masks]. pair's masks depend on batch_rows."""
    if n_masks < 2:
        raise ValueError(f"measure_curve needs n_masks >= 2 (a variance over masks), got {n_masks}")
    t_grid = torch.linspace(1 / T, 1 - 1 / T, T - 1)
    x0, eligible = dataset.batch(n_x0, "train", generator)
    rows = lambda z: z.repeat_interleave(n_masks, 0).repeat(T - 1, 1)  # ordered (t, x0, mask)
    x0, eligible, t = rows(x0), rows(eligible), t_grid.repeat_interleave(n_x0 * n_masks)
    device, was_training = next(model.parameters()).device, model.training
    model.eval()
    losses = []
    for i in range(0, len(t), batch_rows):
        x, e, tt = (z[i:i + batch_rows].to(device) for z in (x0, eligible, t))
        masks = None if model.config.causal else draw_masks(e, tt, spec, generator)
        for j in range(0, len(tt), forward_rows):
            part = slice(j, j + forward_rows)
            sub = None if masks is None else tuple(m[part] for m in masks)
            losses.append(row_losses(model, x[part], e[part], tt[part], spec, masks=sub).cpu())
    model.train(was_training)
    losses = torch.cat(losses).view(T - 1, n_x0, n_masks)
    curve = dict(t=t_grid, m=(losses ** 2).mean((1, 2)), g=losses.mean((1, 2)),
                 v=losses.var(2).mean(1))
    return curve | ({"draws": losses.double().transpose(0, 1)} if keep_draws else {})


def tail_coefficients(t_grid, m):
    """(alpha, beta) >= 0 of m(t) ≈ alpha + beta / p(t), p = mask_rate(t), the law of m below the
    grid: least squares of m_j p_j = alpha p_j + beta, weights p_j, on the t_j <= TAIL_T (>= 2); a
    negative coefficient is set to 0, the other refitted (docs/variance.md, "Below the grid")."""
    t, m = torch.as_tensor(t_grid, dtype=torch.float64), torch.as_tensor(m, dtype=torch.float64)
    k = max(2, int((t <= TAIL_T).sum()))
    p, y = mask_rate(t[:k]), m[:k] * mask_rate(t[:k])
    design = torch.stack([p, torch.ones_like(p)], 1) * p.sqrt()[:, None]
    alpha, beta = torch.linalg.lstsq(design, (y * p.sqrt())[:, None]).solution[:, 0].tolist()
    if alpha < 0:
        alpha, beta = 0.0, ((p * y).sum() / p.sum()).item()
    elif beta < 0:
        alpha, beta = ((p * y * p).sum() / (p * p * p).sum()).item(), 0.0
    return alpha, beta


def extended_sqrt_m(t_grid, sqrt_m, t):
    """√m at t (float64): piecewise linear on t_grid; below t_grid[0] the 1/p law of
    tail_coefficients, √(alpha + beta / p(t)); above t_grid[-1] flat (there m barely moves)."""
    t, t_grid, sqrt_m = (torch.as_tensor(z, dtype=torch.float64) for z in (t, t_grid, sqrt_m))
    alpha, beta = tail_coefficients(t_grid, sqrt_m ** 2)
    inside = torch.from_numpy(np.interp(t.numpy(), t_grid.numpy(), sqrt_m.numpy()))
    return torch.where(t < t_grid[0], (alpha + beta / mask_rate(t)).sqrt(), inside)


def epr_params(theta):
    """theta[7] -> the EPR parameters (EPR_NAMES): a, b, c, kappa, r, q = softplus > 0, n > 1."""
    sp = F.softplus(theta)
    return dict(zip(EPR_NAMES, (*sp[:6], 1 + sp[6])))


def epr_log_density(t, a, b, c, kappa, r, q, n):
    """log of the unnormalised EPR density p(t) ∝ √(a t^r + b (1-t)^q + c^2 exp(2 kappa t^n)),
    amplitudes a, b, c, powers r, q, n; in log space, so exp(2 kappa t^n) cannot overflow."""
    terms = torch.stack([a.log() + torch.xlogy(r, t), b.log() + torch.xlogy(q, 1 - t),
                         2 * c.log() + 2 * kappa * t ** n])
    return 0.5 * torch.logsumexp(terms, 0)


def log_normalise(log_p, t):
    """log p - log int p (trapezoid rule on the grid t; the max is taken out before exp)."""
    top = log_p.max()
    return log_p - top - torch.trapezoid((log_p - top).exp(), t).log()


def epr_theta(params):
    """epr_params's inverse: the theta[7] (float64) whose EPR parameters are params."""
    x = torch.tensor([params[k] - (k == "n") for k in EPR_NAMES], dtype=torch.float64)
    return x + (-torch.expm1(-x)).log()  # softplus^-1(x) = log(e^x - 1)


def fit_epr(t_grid, sqrt_m, n_starts=8, seed=0, init=None, agree=1e-5, history_size=10,
            max_iter=100):
    """The EPR parameters (dict of floats) minimising KL(√m || p) on the grid, both normalised by
    the trapezoid rule (inf where p overflows), by L-BFGS (history_size) from init (the warm start:
    a previous fit's params) if given, then up to n_starts N(0, 1) draws (seed), until the best fit
    and another agree, KL(p_best || p) < agree (None: all run). Deterministic."""
    t, target = (torch.as_tensor(z, dtype=torch.float64) for z in (t_grid, sqrt_m))
    log_p = lambda th: log_normalise(epr_log_density(t, **epr_params(th)), t)
    kl = lambda q, th: torch.trapezoid(torch.xlogy(q, q) - q * log_p(th), t).nan_to_num(math.inf)
    target, fits = target / torch.trapezoid(target, t), []  # fits: (KL, theta), lowest KL first
    starts = ([] if init is None else [epr_theta(init)]) + list(torch.randn(
        n_starts, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors of T - 1 numbers: more threads only wait on each other
    for theta in starts:
        theta = theta.clone().requires_grad_()
        lbfgs = torch.optim.LBFGS([theta], max_iter=max_iter, history_size=history_size,
                                  line_search_fn="strong_wolfe")

        def kl_step():  # L-BFGS's closure: the KL at theta, its gradient in theta.grad
            lbfgs.zero_grad()
            (loss := kl(target, theta)).backward()
            return loss
        lbfgs.step(kl_step)
        value, theta = kl(target, theta.detach()).item(), theta.detach()
        fits = sorted(fits + [(value, theta)] * math.isfinite(value), key=lambda f: f[0])
        if agree is not None and any(kl(log_p(fits[0][1]).exp(), th) < agree for _, th in fits[1:]):
            break
    torch.set_num_threads(threads)
    if not fits:
        raise ValueError("the EPR fit diverged from every start; use fit='none' or more n_starts")
    return {k: v.item() for k, v in epr_params(fits[0][1]).items()}


def _float32_inside(lo, hi):
    """The widest [lo', hi'] inside [lo, hi] with float32 ends: a float64 t in [lo', hi'] stays in
    it when rounded to float32, so the float32 draws never leave the support."""
    lo32, hi32 = torch.tensor([lo, hi], dtype=torch.float64).float()
    lo32 = torch.nextafter(lo32, torch.tensor(math.inf)) if lo32.double() < lo else lo32
    hi32 = torch.nextafter(hi32, torch.tensor(-math.inf)) if hi32.double() > hi else hi32
    return lo32.item(), hi32.item()


class PPOTS(Sampler):
    """P-POTS: t ~ p(t), w = 1/p(t), p ∝ √m with m = E[l^2 | t], the least second moment of w l
    (docs/variance.md, "Why p ∝ √m"; "The sampler" for the table and options). sqrt_m is √m on
    t_grid (the paper's w(t)); p follows it (fit='none': extended_sqrt_m) or its EPR fit (fit='epr',
    the paper's), constant on CELLS equal cells of the support and drawn exactly: w is unbiased.
      support    'full': t in [0, 1]. 'grid': [t_grid[0], t_grid[-1]]: BIASED, a truncation.
      mix        p = (1 - mix) p + mix / |support|: still unbiased, w <= |support| / mix.
      max_weight w = min(1/p, max_weight): BIASED.
      init       a previous fit's params (on a refit): fit_epr's warm start, before n_starts.
    State: `keys` (params None for fit='none'); the table lo, hi, cdf, p is computed from them.
    Tensors are replaced, never changed in place, so a state_dict is a snapshot."""
    name = "ppots"
    keys = ("t_grid", "sqrt_m", "fit", "support", "n_starts", "seed", "max_weight", "mix", "params")

    def __init__(self, t_grid, sqrt_m, fit="epr", n_starts=8, seed=0, max_weight=None, mix=0.0,
                 support="full", init=None):
        if fit not in ("epr", "none") or support not in ("full", "grid") or not 0 <= mix <= 1:
            raise ValueError(f"P-POTS needs fit 'epr'|'none', support 'full'|'grid', 0 <= mix <= 1;"
                             f" got {fit!r}, {support!r}, {mix}")
        self.t_grid = torch.as_tensor(t_grid, dtype=torch.float64)
        self.sqrt_m = torch.as_tensor(sqrt_m, dtype=torch.float64)
        if len(self.t_grid) < 2 or self.sqrt_m.shape != self.t_grid.shape:
            raise ValueError(f"P-POTS needs >= 2 grid points and one √m per point, got "
                             f"{len(self.t_grid)} points and {len(self.sqrt_m)} values")
        self.fit, self.support, self.n_starts, self.seed = fit, support, n_starts, seed
        self.max_weight, self.mix, self.params = max_weight, mix, init
        self._refit()

    @classmethod
    def from_state(cls, sd):
        """The saved curve, settings and params, tabulated again (not refitted): same draws."""
        sampler = cls.__new__(cls)
        vars(sampler).update({k: sd[k] for k in cls.keys})
        sampler._tabulate()
        return sampler

    def _refit(self):
        self.params = (fit_epr(self.t_grid, self.sqrt_m, self.n_starts, self.seed, self.params)
                       if self.fit == "epr" else None)  # warm-started from the last params
        self._tabulate()

    def _tabulate(self):
        """The support [lo, hi], the CDF at its CELLS + 1 cell edges, the density p on each cell."""
        grid = (self.t_grid[0].item(), self.t_grid[-1].item())
        self.lo, self.hi = _float32_inside(*((0.0, 1.0) if self.support == "full" else grid))
        u = torch.linspace(self.lo, self.hi, CELLS + 1, dtype=torch.float64)
        params = {k: torch.tensor(v, dtype=torch.float64) for k, v in (self.params or {}).items()}
        curve = (log_normalise(epr_log_density(u, **params), u).exp() if self.fit == "epr"
                 else self.sqrt_m_at(u))
        cdf = F.pad(torch.cumulative_trapezoid(curve, u), (1, 0))
        self.cdf = (1 - self.mix) * cdf / cdf[-1] + self.mix * torch.linspace(0, 1, CELLS + 1,
                                                                             dtype=torch.float64)
        self.p = self.cdf.diff() * CELLS / (self.hi - self.lo)

    def sqrt_m_at(self, t):
        """The measured √m at t, extended beyond the grid (extended_sqrt_m), float64."""
        return extended_sqrt_m(self.t_grid, self.sqrt_m, t)

    def sample(self, n, generator=None):
        """Inverse CDF: u ~ U(0,1); the cell i with cdf[i] <= u < cdf[i+1] by searchsorted, then
        linear interpolation inside it. w is evaluated at the returned (float32) t."""
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        i = torch.searchsorted(self.cdf, u, right=True) - 1
        x = (i + (u - self.cdf[i]) / (self.cdf[i + 1] - self.cdf[i])) / CELLS
        t = (self.lo + (self.hi - self.lo) * x).float()
        return t, self.weight(t)

    def density(self, t):
        """The normalised density p(t) that sample() draws from (float64; 0 off the support)."""
        t = t.double()
        cell = ((t - self.lo) / (self.hi - self.lo) * CELLS).long().clamp(0, CELLS - 1)
        return torch.where((t >= self.lo) & (t <= self.hi), self.p[cell], 0.0)

    def weight(self, t):
        """w(t) = 1/p(t), capped at max_weight if set."""
        w = 1 / self.density(t)
        return (w if self.max_weight is None else w.clamp(max=self.max_weight)).float()


def build_ppots(model, dataset, spec=MaskSpec(), generator=None, T=70, n_x0=32, n_masks=4, **kw):
    """measure_curve on the model as it is, then PPOTS(t, √m, **kw) fits and tabulates."""
    curve = measure_curve(model, dataset, spec, T, n_x0, n_masks, generator)
    return PPOTS(curve["t"], curve["m"].sqrt(), **kw)


# ----------------------------------------------------------------------------- construction
LAWS = dict(zip(SAMPLERS, (UniformSampler, StratifiedSampler, ClippedSampler, PPOTS)))


def make_sampler(name, **kw):
    """A sampler by name (SAMPLERS), kw its constructor's: k=; lo=, hi=; t_grid=, sqrt_m=, ...."""
    if name not in LAWS:
        raise ValueError(f"unknown t-sampler {name!r}; choose from {sorted(LAWS)}")
    return LAWS[name](**kw)


def sampler_from_state(sd):
    """The sampler whose state_dict() is sd (resume, DDP), by its law's from_state: a P-POTS gets
    its curve and params back, not refitted, so it draws identically."""
    if sd["name"] not in LAWS:
        raise ValueError(f"no t-sampler named {sd['name']!r} among {sorted(LAWS)}")
    return LAWS[sd["name"]].from_state(sd)


# ----------------------------------------------------------------------------- behind the seam
def curve_integrals(t_grid, sqrt_m, tail_cells=1024):
    """(int_0^1 m, int_0^1 √m) of extended_sqrt_m: uniform t's second moment and the root of the
    optimum's. Exact on and above the grid; below it the midpoint rule on tail_cells cells."""
    t, s = (torch.as_tensor(z, dtype=torch.float64) for z in (t_grid, sqrt_m))
    h, lo, hi = t.diff(), s[:-1], s[1:]
    u = (torch.arange(tail_cells, dtype=torch.float64) + 0.5) / tail_cells * t[0]
    tail = extended_sqrt_m(t, s, u)
    m = ((h * (lo ** 2 + lo * hi + hi ** 2) / 3).sum() + (1 - t[-1]) * s[-1] ** 2
         + (tail ** 2).mean() * t[0])
    root = (h * (lo + hi) / 2).sum() + (1 - t[-1]) * s[-1] + tail.mean() * t[0]
    return m.item(), root.item()


def second_moments(sampler):
    """(int p w^2 m, (int √m)^2) / int m, m = extended_sqrt_m^2, for a PPOTS: its predicted
    E_p[(w l)^2] (midpoint rule, 16 CELLS cells) and the optimum's, relative to uniform t's."""
    u = (torch.arange(16 * CELLS, dtype=torch.float64) + 0.5) / (16 * CELLS)
    m, p = sampler.sqrt_m_at(u) ** 2, sampler.density(u)
    ours = torch.where(p > 0, p * sampler.weight(u).double() ** 2 * m, 0.0).mean().item()
    uniform, root = curve_integrals(sampler.t_grid, sampler.sqrt_m)
    return ours / uniform, root ** 2 / uniform


def describe_fit(sampler):
    """One line: a PPOTS's fit, settings and second_moments. Unbiased laws share the mean, so the
    variance falls by (1 - ratio) E_U[l^2]."""
    s, (ours, best) = sampler, second_moments(sampler)
    fitted = " ".join(f"{k}={v:.3g}" for k, v in s.params.items()) if s.params else "measured curve"
    support = f" support=[{s.lo:.4g}, {s.hi:.4g}] (BIASED: truncated)" * (s.support == "grid")
    return (f"ppots fit={s.fit} ({fitted}) mix={s.mix} max_weight={s.max_weight}{support}: "
            f"E[(w l)^2] vs uniform x{ours:.3f} (optimum x{best:.3f})")


class OnlinePPOTS(PPOTS):
    """PPOTS refitted from the training losses, no extra forward (not in the paper: docs/variance.md
    "Online refits"). State: PPOTS's and the bins sum_l2, count, named 'ppots_online'."""
    name = "ppots_online"
    keys = PPOTS.keys + ("sum_l2", "count")

    def __init__(self, sampler):
        """The fitted PPOTS `sampler` (its attributes, shared) with empty bins: same draws."""
        vars(self).update(vars(sampler))
        self.sum_l2, self.count = torch.zeros_like(self.t_grid), torch.zeros_like(self.t_grid)

    def observe(self, t, loss):
        """Add the UNWEIGHTED l^2 to the nearest grid point's bin (t beyond the grid by over half a
        spacing is ignored): each bin estimates m(t_j) = E[l^2 | t ≈ t_j], whatever law drew t."""
        tg = self.t_grid
        edges = torch.cat([tg[:1] - (tg[1] - tg[0]) / 2, (tg[1:] + tg[:-1]) / 2,
                           tg[-1:] + (tg[-1] - tg[-2]) / 2])
        j = torch.bucketize(t.detach().double().cpu(), edges) - 1
        keep = (j >= 0) & (j < len(tg))
        self.sum_l2 = self.sum_l2.index_add(0, j[keep], loss.detach().double().cpu()[keep] ** 2)
        self.count = self.count.index_add(0, j[keep], torch.ones_like(j[keep], dtype=torch.float64))

    def refit_online(self):
        """Refit on m(t_j) = sum l^2 / count of the bins (an empty bin keeps its m); empty them."""
        m = torch.where(self.count > 0, self.sum_l2 / self.count.clamp(min=1), self.sqrt_m ** 2)
        self.sqrt_m = m.sqrt()
        self.sum_l2, self.count = torch.zeros_like(self.t_grid), torch.zeros_like(self.t_grid)
        self._refit()


def restore_sampler(sd):
    """sampler_from_state, and OnlinePPOTS.from_state for an online P-POTS state."""
    return OnlinePPOTS.from_state(sd) if sd["name"] == OnlinePPOTS.name else sampler_from_state(sd)
