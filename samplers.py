"""Masking-rate (t) samplers for MDM training: uniform, stratified (StraTS), clipped and P-POTS.

The MDM loss is L = int_0^1 E[l | t] dt (l = masking.row_losses). A sampler draws t_1..t_n with
weights w_i and train.py minimises mean_i w_i l(t_i): unbiased when E[w f(t)] = int_0^1 f(t) dt
for every f, i.e. when the weighted loss estimates L itself.

    sampler = make_sampler("stratified")          # P-POTS: build_ppots(model, task)
    t, w = sampler.sample(batch_size, generator)  # FloatTensor[n] each, CPU
    loss = (w * row_losses(model, x0, eligible, t.to(device), masking)).mean()

Top to bottom: the interface and the three simple t-laws; the P-POTS core (measure_curve, fit_epr,
PPOTSCore: measure, fit, sample; derivations in docs/variance.md, "P-POTS"); construction. Behind
the seam at the end, PPOTSSampler's online refits and diagnostics: skipping them loses nothing.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from masking import MaskSpec, draw_masks, mask_rate, row_losses

CELLS = 4096  # P-POTS tabulates p on 4096 equal cells of its support
FINE = 16 * CELLS  # midpoint-rule cells of [0, 1] for second_moments' int p w^2 m
TAIL_T = 0.3  # the 1/p law of m below the grid is fitted on the grid points with t <= TAIL_T
EPR_NAMES = ("a", "b", "A", "kappa", "r", "q", "m")
SAMPLERS = ("uniform", "stratified", "clipped", "ppots")  # the t-laws, by name


class Sampler:
    """sample(n, generator) -> (t, w): one training batch's draws. The state is `name` plus the
    attributes in `keys` (python values and tensors, so a weights_only checkpoint can hold it)."""
    name, keys = None, ()

    def marginal(self, n, generator=None):
        """n i.i.d. draws from the law of ONE row of a batch. The default is sample(n), right for
        every sampler whose draws within a call are independent; StraTS overrides it."""
        return self.sample(n, generator)

    def state_dict(self):
        return {"name": self.name, **{k: getattr(self, k) for k in self.keys}}

    def load_state_dict(self, sd):
        for k in self.keys:
            setattr(self, k, sd[k])

    def describe(self):
        return " ".join([self.name] + [f"{k}={getattr(self, k)}" for k in self.keys])


class UniformSampler(Sampler):
    """t ~ U(0, 1), w = 1: the standard MDM estimator (unbiased)."""
    name = "uniform"

    def sample(self, n, generator=None):
        return torch.rand(n, generator=generator), torch.ones(n)


class StratifiedSampler(Sampler):
    """StraTS: k equal strata of [0, 1] (None: k = ceil(√n)), n // k uniform draws in each and the
    n % k left over in distinct random strata, so each stratum expects n/k draws (unbiased); w = 1.
    The draws are shuffled, so no row is tied to a stratum. Each row's t is U(0, 1), but the draws
    of one call are dependent: marginal() gives the i.i.d. law a per-draw decomposition needs."""
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


# ----------------------------------------------------------------------------- P-POTS core
@torch.no_grad()
def measure_curve(model, task, masking=MaskSpec(), T=70, n_x0=32, n_masks=4, generator=None,
                  batch_rows=2048, forward_rows=512, keep_draws=False):
    """m(t_j) = E[l^2 | t_j] on t_j = linspace(1/T, 1 - 1/T, T - 1), from n_x0 training examples
    times n_masks masks, in eval mode (the training flag is restored). Returns dict(t, m, g, v),
    float32[T - 1]: m the plain mean of l^2 (docs/variance.md, "The measured m"), g and v the
    per-x0 mean and variance over masks, averaged over x0; with keep_draws also the losses
    draws[n_x0, T - 1, n_masks] (x0 first, for a bootstrap over x0). Cost: (T - 1) n_x0 n_masks
    clean rows, twice that in forward rows for mirror/pair. Masks are drawn batch_rows rows at a
    time (pair's draws depend on it); the model runs forward_rows at a time (the result does not;
    512 is fastest on a CPU: bench.py's 'P-POTS measure')."""
    if n_masks < 2:
        raise ValueError(f"measure_curve needs n_masks >= 2 (for the variance over masks), "
                         f"got {n_masks}")
    t_grid = torch.linspace(1 / T, 1 - 1 / T, T - 1)
    x0, eligible = task.batch(n_x0, "train", generator)
    rows = lambda z: z.repeat_interleave(n_masks, 0).repeat(T - 1, 1)  # ordered (t, x0, mask)
    x0, eligible, t = rows(x0), rows(eligible), t_grid.repeat_interleave(n_x0 * n_masks)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses = []
    for i in range(0, len(t), batch_rows):
        x, e, tt = (z[i:i + batch_rows].to(device) for z in (x0, eligible, t))
        masks = None if model.config.causal else draw_masks(e, tt, masking, generator)
        for j in range(0, len(tt), forward_rows):
            part = slice(j, j + forward_rows)
            losses.append(row_losses(model, x[part], e[part], tt[part], masking,
                                     masks=None if masks is None else tuple(m[part] for m in masks))
                          .cpu())
    model.train(was_training)
    losses = torch.cat(losses).view(T - 1, n_x0, n_masks)
    curve = dict(t=t_grid, m=(losses ** 2).mean((1, 2)), g=losses.mean((1, 2)),
                 v=losses.var(2).mean(1))
    if keep_draws:
        curve["draws"] = losses.double().transpose(0, 1)
    return curve


def tail_coefficients(t_grid, m):
    """(alpha, beta) of m(t) ≈ alpha + beta / p(t), p = mask_rate(t): the law of m below the grid
    (extended_sqrt_m), exact for fixed token CEs. Weighted least squares of y_j = m_j p_j =
    alpha p_j + beta on the grid points t_j <= TAIL_T (at least two), weights p_j ∝ 1/Var y_j; a
    negative coefficient (noise) is set to 0 and the other refitted, so the extension stays
    positive. Derivation and accuracy: docs/variance.md, "Below the grid"."""
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
    t = torch.as_tensor(t, dtype=torch.float64)
    t_grid, sqrt_m = (torch.as_tensor(z, dtype=torch.float64) for z in (t_grid, sqrt_m))
    alpha, beta = tail_coefficients(t_grid, sqrt_m ** 2)
    inside = torch.from_numpy(np.interp(t.numpy(), t_grid.numpy(), sqrt_m.numpy()))
    return torch.where(t < t_grid[0], (alpha + beta / mask_rate(t)).sqrt(), inside)


def epr_params(theta):
    """theta[7] -> EPR parameters: a, b, A, kappa, r, q = softplus > 0; m = 1 + softplus > 1."""
    sp = F.softplus(theta)
    return dict(zip(EPR_NAMES, (*sp[:6], 1 + sp[6])))


def epr_log_density(t, a, b, A, kappa, r, q, m):
    """log of the unnormalised EPR density p(t) ∝ √(a t^r + b (1-t)^q + A^2 exp(2 kappa t^m)),
    summed in log space so that exp(2 kappa t^m) cannot overflow."""
    terms = torch.stack([a.log() + torch.xlogy(r, t), b.log() + torch.xlogy(q, 1 - t),
                         2 * A.log() + 2 * kappa * t ** m])
    return 0.5 * torch.logsumexp(terms, 0)


def log_normalise(log_p, t):
    """log p - log int p (trapezoid rule on the grid t; the max is taken out before exp)."""
    top = log_p.max()
    return log_p - top - torch.trapezoid((log_p - top).exp(), t).log()


def epr_kl(theta, t, target):
    """KL(target || p_theta) on the grid t, p_theta the normalised EPR density, by the trapezoid
    rule; inf where the density overflows."""
    log_p = log_normalise(epr_log_density(t, **epr_params(theta)), t)
    return torch.trapezoid(torch.xlogy(target, target) - target * log_p, t).nan_to_num(math.inf)


def fit_epr(t_grid, sqrt_m, n_starts=20, seed=0, max_iter=100):
    """Fit the EPR family to the measured √m: argmin KL(√m || p) on the grid, both normalised by
    the trapezoid rule. Multi-start: n_starts random starts (fixed seed), each run through L-BFGS;
    the lowest KL wins. Returns the parameters as a dict of python floats."""
    t = torch.as_tensor(t_grid, dtype=torch.float64)
    target = torch.as_tensor(sqrt_m, dtype=torch.float64)
    target = target / torch.trapezoid(target, t)
    starts = torch.randn(n_starts, 7, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.float64)
    best, best_kl = None, math.inf
    for theta in starts:
        theta = theta.clone().requires_grad_()
        lbfgs = torch.optim.LBFGS([theta], max_iter=max_iter, line_search_fn="strong_wolfe")

        def kl_step():  # L-BFGS's closure: the KL at theta, its gradient in theta.grad
            lbfgs.zero_grad()
            loss = epr_kl(theta, t, target)
            loss.backward()
            return loss
        lbfgs.step(kl_step)
        kl = epr_kl(theta.detach(), t, target).item()
        if kl < best_kl:
            best, best_kl = theta.detach(), kl
    if best is None:
        raise ValueError("the EPR fit diverged from every start; use fit='none' or more n_starts")
    return {k: v.item() for k, v in epr_params(best).items()}


def _float32_inside(lo, hi):
    """The widest [lo', hi'] inside [lo, hi] with float32 ends: a float64 t in [lo', hi'] stays in
    it when rounded to float32, so the float32 draws never leave the support."""
    ends = torch.tensor([lo, hi], dtype=torch.float64).float()
    if ends[0].double() < lo:
        ends[0] = torch.nextafter(ends[0], torch.tensor(math.inf))
    if ends[1].double() > hi:
        ends[1] = torch.nextafter(ends[1], torch.tensor(-math.inf))
    return ends[0].item(), ends[1].item()


class PPOTSCore(Sampler):
    """P-POTS, the paper's Pareto-optimal t-sampler: t ~ p(t), weight w = 1/p(t), p ∝ √m.

    With m(t) = E[l^2 | t] the estimate's second moment is int m/p, smallest for p ∝ √m, where it
    is (int √m)^2 against int m for uniform t (Cauchy–Schwarz: docs/variance.md, "Why p ∝ √m").
    sqrt_m is the measured √m on t_grid (measure_curve; the paper's w(t), not the weight), used as
    is (fit='none': extended_sqrt_m) or through its EPR fit on the grid (fit='epr', the paper's).
    p is piecewise constant on CELLS equal cells of the support (trapezoid cell averages of the
    curve); inverse-CDF sampling, linear inside a cell, draws exactly that p, so w = 1/p is
    exactly unbiased. Options (the defaults keep it unbiased):
      support    'full': t in [0, 1]. 'grid': t in [t_grid[0], t_grid[-1]], p normalised there:
                 BIASED, it drops the integral's noisiest end (the paper's released sampler).
      mix        p_mix = (1 - mix) p + mix / |support|: still unbiased, w <= |support| / mix.
      max_weight w = min(1/p, max_weight): BIASED (under-weights the rarely drawn t), bounds w.
    State: t_grid, sqrt_m, the settings and params (dict of floats; None for fit='none'); updates
    replace tensors, never in place, so a state_dict is a snapshot.
    """
    name = "ppots"
    keys = ("t_grid", "sqrt_m", "fit", "support", "n_starts", "seed", "max_weight", "mix",
            "params")

    def __init__(self, t_grid, sqrt_m, fit="epr", n_starts=20, seed=0, max_weight=None, mix=0.0,
                 support="full"):
        if fit not in ("epr", "none"):
            raise ValueError(f"unknown P-POTS fit {fit!r}; choose 'epr' or 'none'")
        if support not in ("full", "grid"):
            raise ValueError(f"unknown P-POTS support {support!r}; choose 'full' or 'grid'")
        if not 0 <= mix <= 1:
            raise ValueError(f"P-POTS mix must be in [0, 1], got {mix}")
        self.t_grid = torch.as_tensor(t_grid, dtype=torch.float64)
        self.sqrt_m = torch.as_tensor(sqrt_m, dtype=torch.float64)
        if len(self.t_grid) < 2 or self.sqrt_m.shape != self.t_grid.shape:
            raise ValueError(f"P-POTS needs >= 2 grid points and one √m per point, got "
                             f"{len(self.t_grid)} points and {len(self.sqrt_m)} values")
        self.fit, self.support, self.n_starts, self.seed = fit, support, n_starts, seed
        self.max_weight, self.mix = max_weight, mix
        self._refit()

    def _refit(self):
        self.params = (fit_epr(self.t_grid, self.sqrt_m, self.n_starts, self.seed)
                       if self.fit == "epr" else None)
        self._tabulate()

    def _tabulate(self):
        """The support [lo, hi], the CDF at its CELLS + 1 cell edges, the density p on each cell."""
        grid = (self.t_grid[0].item(), self.t_grid[-1].item())
        self.lo, self.hi = _float32_inside(*((0.0, 1.0) if self.support == "full" else grid))
        u = torch.linspace(self.lo, self.hi, CELLS + 1, dtype=torch.float64)
        if self.fit == "epr":
            params = {k: torch.tensor(v, dtype=torch.float64) for k, v in self.params.items()}
            curve = log_normalise(epr_log_density(u, **params), u).exp()
        else:
            curve = self.sqrt_m_at(u)
        cdf = F.pad(torch.cumulative_trapezoid(curve, u), (1, 0))
        self.cdf = (1 - self.mix) * cdf / cdf[-1] + self.mix * torch.linspace(0, 1, CELLS + 1,
                                                                             dtype=torch.float64)
        self.p = self.cdf.diff() * CELLS / (self.hi - self.lo)

    def load_state_dict(self, sd):
        """Also loads a state dict from before the rename w_grid -> sqrt_m and before `support`."""
        sd = {"support": "full", **sd}
        if "w_grid" in sd:
            sd["sqrt_m"] = sd.pop("w_grid")
        super().load_state_dict(sd)
        self._tabulate()

    def sqrt_m_at(self, t):
        """The measured √m at t, extended beyond the grid (extended_sqrt_m), float64."""
        return extended_sqrt_m(self.t_grid, self.sqrt_m, t)

    def density(self, t):
        """The normalised density p(t) that sample() draws from (float64; 0 off the support)."""
        t = t.double()
        cell = ((t - self.lo) / (self.hi - self.lo) * CELLS).long().clamp(0, CELLS - 1)
        return torch.where((t >= self.lo) & (t <= self.hi), self.p[cell], 0.0)

    def weight(self, t):
        """w(t) = 1/p(t), capped at max_weight if set."""
        w = 1 / self.density(t)
        return (w if self.max_weight is None else w.clamp(max=self.max_weight)).float()

    def sample(self, n, generator=None):
        """Inverse CDF: u ~ U(0,1); the cell i with cdf[i] <= u < cdf[i+1] by searchsorted, then
        linear interpolation inside it. w is evaluated at the returned (float32) t."""
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        i = torch.searchsorted(self.cdf, u, right=True) - 1
        x = (i + (u - self.cdf[i]) / (self.cdf[i + 1] - self.cdf[i])) / CELLS
        t = (self.lo + (self.hi - self.lo) * x).float()
        return t, self.weight(t)


# ----------------------------------------------------------------------------- construction
def build_ppots(model, task, masking=MaskSpec(), generator=None, T=70, n_x0=32, n_masks=4, **kw):
    """Measure the curve (measure_curve) and return PPOTSSampler(t, √m, **kw)."""
    curve = measure_curve(model, task, masking, T, n_x0, n_masks, generator)
    return PPOTSSampler(curve["t"], curve["m"].sqrt(), **kw)


def make_sampler(name, **kw):
    """A sampler by name (SAMPLERS): uniform, stratified (k=), clipped (lo=, hi=), ppots (t_grid=,
    sqrt_m=, ...)."""
    laws = dict(zip(SAMPLERS, (UniformSampler, StratifiedSampler, ClippedSampler, PPOTSSampler)))
    if name not in laws:
        raise ValueError(f"unknown t-sampler {name!r}; choose from {sorted(laws)}")
    return laws[name](**kw)


def sampler_from_state(sd):
    """Rebuild a sampler from its state_dict() alone (resume): P-POTS gets its curve, params and
    bins back without re-measuring or refitting, so it samples identically; old w_grid dicts too."""
    if sd["name"] == "ppots":  # fit='none' is cheap; load_state_dict sets the rest
        sampler = PPOTSSampler(sd["t_grid"], torch.ones(len(sd["t_grid"])), fit="none")
    else:
        sampler = make_sampler(sd["name"])
    sampler.load_state_dict(sd)
    return sampler


# ----------------------------------------------------------------------------- behind the seam
# P-POTS's online refits (not in the paper) and its diagnostics: PPOTSCore is the whole method.
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


class PPOTSSampler(PPOTSCore):
    """PPOTSCore plus online refits from the training losses (observe, refit_online) and the
    predicted second moments (second_moments, describe). Its state adds the bins sum_l2, count."""
    keys = PPOTSCore.keys + ("sum_l2", "count")

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.sum_l2, self.count = torch.zeros_like(self.t_grid), torch.zeros_like(self.t_grid)

    def observe(self, t, loss):
        """Online mode (not in the paper; no extra forward pass): add the UNWEIGHTED losses' l^2 at
        their t to the nearest grid point's bin (t over half a spacing beyond the grid is ignored).
        That t ~ p does not matter: each bin estimates the conditional m(t_j) = E[l^2 | t ≈ t_j]."""
        tg = self.t_grid
        edges = torch.cat([tg[:1] - (tg[1] - tg[0]) / 2, (tg[1:] + tg[:-1]) / 2,
                           tg[-1:] + (tg[-1] - tg[-2]) / 2])
        j = torch.bucketize(t.detach().double().cpu(), edges) - 1
        keep = (j >= 0) & (j < len(tg))
        self.sum_l2 = self.sum_l2.index_add(0, j[keep], loss.detach().double().cpu()[keep] ** 2)
        self.count = self.count.index_add(0, j[keep],
                                          torch.ones(int(keep.sum()), dtype=torch.float64))

    def refit_online(self):
        """Refit on m(t_j) = sum l^2 / count of the bins since the last refit (an empty bin keeps
        its estimate), then empty them, so each refit sees the latest model."""
        seen = self.count > 0
        m = torch.where(seen, self.sum_l2 / self.count.clamp(min=1), self.sqrt_m ** 2)
        self.sqrt_m = m.sqrt()
        self.sum_l2, self.count = torch.zeros_like(self.t_grid), torch.zeros_like(self.t_grid)
        self._refit()

    def second_moments(self):
        """(int p w^2 m, (int √m)^2) / int m: the predicted E_p[(w l)^2] (midpoint rule on FINE
        cells) and any unbiased law's optimum, relative to uniform t's; m is extended_sqrt_m^2."""
        u = (torch.arange(FINE, dtype=torch.float64) + 0.5) / FINE
        m, p = self.sqrt_m_at(u) ** 2, self.density(u)
        ours = torch.where(p > 0, p * self.weight(u).double() ** 2 * m, 0.0).mean().item()
        uniform, root = curve_integrals(self.t_grid, self.sqrt_m)
        return ours / uniform, root ** 2 / uniform

    def describe(self):
        """One line: the fit and second_moments (a ratio of SECOND moments: unbiased laws share the
        mean, so the variance falls by (1 - ratio) E_U[l^2])."""
        fitted = (" ".join(f"{k}={v:.3g}" for k, v in self.params.items()) if self.params
                  else "measured curve")
        support = ("" if self.support == "full"
                   else f" support=[{self.lo:.4g}, {self.hi:.4g}] (BIASED: truncated)")
        ours, best = self.second_moments()
        return (f"ppots fit={self.fit} ({fitted}) mix={self.mix} max_weight={self.max_weight}"
                f"{support}: E[(w l)^2] vs uniform x{ours:.3f} (optimum x{best:.3f})")
