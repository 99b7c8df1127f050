"""Masking-rate (t) samplers for MDM training: uniform, stratified (StraTS), clipped and P-POTS.

The MDM loss is L = int_0^1 E[l | t] dt (l = masking.row_losses). A sampler draws t_1..t_n with
weights w_i and train.py minimises mean_i w_i l(t_i). It is unbiased when E[w f(t)] = int_0^1 f(t)
dt for every f, i.e. when the weighted loss estimates L itself.

    sampler = make_sampler("stratified")          # P-POTS: build_ppots(model, task)
    t, w = sampler.sample(batch_size, generator)  # FloatTensor[n] each, CPU
    loss = (w * row_losses(model, x0, eligible, t.to(device), masking)).mean()

Reading order: the Sampler interface and the three simple t-laws; the P-POTS core (measure_curve,
the extension of m below the grid, fit_epr, PPOTSCore: measure, fit, sample; why p ∝ √m is
argued once, in PPOTSCore); construction (build_ppots, make_sampler, sampler_from_state). Behind the
seam at the end: PPOTSSampler, the core plus online refits and diagnostics (curve_integrals,
second_moments, describe); a reader who skips it loses nothing of the method.
"""
import functools
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
    """Interface: sample(n, generator) -> (t, w), the draws of one training batch; marginal(n,
    generator) -> (t, w), n i.i.d. draws of one row's (t, w). The state is `name` plus the
    attributes in `keys` (plain python values and tensors, so a weights_only checkpoint can hold
    it)."""
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
    """StraTS: split [0, 1] into k equal strata and draw uniformly inside each, w = 1.

    n // k draws per stratum; the n % k remaining draws go to distinct strata chosen at random, so
    each stratum expects n/k draws and the estimate stays unbiased (in expectation over that
    choice). k = None uses k = ceil(√n); k = n (the batch size) gives exactly one draw per
    stratum, t_i = (i + u_i)/n. The draws are shuffled so that no row of a batch is tied to a
    stratum. Each row's t is marginally U(0, 1), but the draws of one call are not independent:
    marginal() gives the i.i.d. law that a per-draw variance decomposition needs.
    """
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
    """The "Clipped" baseline of the paper's Table 1: t ~ U(lo, hi), w = 1. BIASED.

    It estimates (1/(hi - lo)) int_lo^hi E[l | t] dt, not the ELBO integral over [0, 1]: it never
    sees t < lo, where the 1/p weight makes l noisiest, nor t > hi, where the model must predict
    from (almost) nothing. Lower variance, different objective. Defaults lo = 0.1, hi = 0.9 are our
    choice (clip 10 % at each end).
    """
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
    """Measure m(t_j) = E[l^2 | t_j] on t_j = linspace(1/T, 1 - 1/T, T - 1) with n_x0 training
    examples and n_masks masks each, in eval mode (the model's training flag is restored). Cost:
    (T - 1) n_x0 n_masks clean rows, each one forward row for standard masking and two for
    mirror/pair (both views run), so P-POTS+MIRROR's measurement costs twice P-POTS's. The masks
    are drawn batch_rows rows at a time (pair's draws depend on it, so it stays fixed) and the
    model runs on forward_rows rows at a time (the result does not depend on it; 512 rows are
    faster than 2,048 on a CPU's caches: bench.py's 'P-POTS measure').

    m is the plain mean of l^2 over all n_x0 * n_masks draws: unbiased for E_x0[g(x0,t)^2 +
    v(x0,t)], so it includes the spread of g across x0. (Identity: mean l^2 = mean_x0(g^2 + v
    (n-1)/n) with g, v the per-x0 sample mean and unbiased variance over n = n_masks masks;
    mean_x0(g^2 + v) would overstate m by v/n.) The paper's released code uses g^2 + v of the
    x0-averaged mean g, which drops Var_x0(g). Returns dict(t, m, g = mean_x0 g, v = mean_x0 v),
    float32 tensors of length T - 1, and with keep_draws the losses as draws[n_x0, T - 1, n_masks]
    (x0 first, like variance.measure's draws, for a bootstrap over x0).
    """
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
    """(alpha, beta) of m(t) ≈ alpha + beta / p(t), p = mask_rate(t), fitted on the grid points
    with t <= TAIL_T (at least two): the law extended_sqrt_m uses below the first grid point.

    The law. With the tokens' cross-entropies CE_i fixed, l = sum_i 1{i masked} CE_i / (p P) with
    independent Bernoulli(p) indicators, so E[l^2] = beta/p + alpha exactly, beta = sum_i CE_i^2 /
    P^2 and alpha = sum_{i != j} CE_i CE_j / P^2 (averaged over x0): Var(l | x0, t) = (1 - p) /
    (p P^2) sum_i CE_i^2 and m grows like 1/p as t -> 0. Below t_1 = 1/70 that tail holds beta
    ln(p(t_1)/EPS) = 2.73 beta of int m (30 % of it on a step-250 sort checkpoint), of which a
    flat extension keeps only m(t_1) t_1 = 0.93 beta.
    The fit. m(t_j) is noisiest exactly there (at t_1 = 1/70 with 8 maskable tokens only ~12 % of
    rows mask anything; measuring below t_1 would be noisier still), so extrapolating from m(t_1)
    alone, m(t) = m(t_1) p(t_1)/p(t), is unreliable. Instead we extrapolate with a fit: weighted
    least squares of y_j = m_j p_j = alpha p_j + beta on the points t_j <= TAIL_T (21 of the 69
    at T = 70), weights p_j = 1/Var y_j up to a constant (the few masked tokens give
    l^2 ∝ 1/p^2 with probability ∝ p, so Var m_j ∝ p^-3 and Var y_j ∝ 1/p_j). A drift
    of the CEs with t that is linear in p goes into the slope, so beta is the t -> 0 coefficient.
    Tail integral int_0^t_1 m on that checkpoint, mean ± sd over 12 curves of 69 t x 32 x0 x 4
    masks: 0.063 ± 0.021, against 0.065 from a leave-one-out pass (each token masked alone: the
    t -> 0 limit of beta); m(t_1) alone gives 0.068 ± 0.078. At step 50 (6 curves): 0.58 ± 0.09
    against 0.49, m(t_1) alone 0.63 ± 0.28. A negative coefficient (noise) is set to 0 and the
    other refitted, so the extension stays positive.
    """
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
    tail_coefficients, √(alpha + beta / p(t)); above t_grid[-1] flat. Flat is fine near t = 1:
    there p -> 1, m has no 1/p factor and is smooth, so over the last 1/T it barely moves."""
    t = torch.as_tensor(t, dtype=torch.float64)
    t_grid, sqrt_m = (torch.as_tensor(z, dtype=torch.float64) for z in (t_grid, sqrt_m))
    alpha, beta = tail_coefficients(t_grid, sqrt_m ** 2)
    inside = torch.from_numpy(np.interp(t.numpy(), t_grid.numpy(), sqrt_m.numpy()))
    return torch.where(t < t_grid[0], (alpha + beta / mask_rate(t)).sqrt(), inside)


def epr_params(theta):
    """Unconstrained theta[7] -> EPR parameters: a, b, A, kappa, r, q = softplus > 0;
    m = 1 + softplus > 1."""
    sp = F.softplus(theta)
    return dict(zip(EPR_NAMES, (*sp[:6], 1 + sp[6])))


def epr_log_density(t, a, b, A, kappa, r, q, m):
    """log of the unnormalised EPR density p(t) ∝ √(a t^r + b (1-t)^q + A^2 exp(2 kappa t^m)),
    summed in log space so that exp(2 kappa t^m) cannot overflow."""
    terms = torch.stack([a.log() + torch.xlogy(r, t), b.log() + torch.xlogy(q, 1 - t),
                         2 * A.log() + 2 * kappa * t ** m])
    return 0.5 * torch.logsumexp(terms, 0)


def log_normalise(log_p, t):
    """log p - log int p (trapezoid rule on the grid t), with the max taken out before
    exponentiating."""
    top = log_p.max()
    return log_p - top - torch.trapezoid((log_p - top).exp(), t).log()


def epr_kl(theta, t, target):
    """KL(target || p_theta) on the grid t, p_theta the normalised EPR density, by the trapezoid
    rule; inf where the density overflows."""
    log_p = log_normalise(epr_log_density(t, **epr_params(theta)), t)
    return torch.trapezoid(torch.xlogy(target, target) - target * log_p, t).nan_to_num(math.inf)


def _kl_step(optimizer, theta, t, target):
    """L-BFGS's closure: the KL at theta, with its gradient in theta.grad."""
    optimizer.zero_grad()
    loss = epr_kl(theta, t, target)
    loss.backward()
    return loss


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
        lbfgs.step(functools.partial(_kl_step, lbfgs, theta, t, target))
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

    Why √m (the one statement of the argument in this repository). With m(t) = E[l^2 | t] =
    g(t)^2 + v(t) (g = E[l | t], v = Var[l | t], both over x0 and masks), the second moment of the
    estimate is E_p[(l/p)^2] = int m/p. Over densities with int p = 1 it is minimised by p*(t) ∝
    √m(t): by Cauchy–Schwarz (int √m)^2 = (int √(m/p) √p)^2 <= int (m/p) · int p
    = int m/p, with equality iff p ∝ √m. The minimal second moment is (int √m)^2, against
    int m for uniform t; every unbiased p has the same mean L, so the variance drops by exactly
    as much as the second moment.

    sqrt_m is the measured √m on t_grid (measure_curve; the paper's w(t), not the weight), taken
    as is (fit='none': extended_sqrt_m, piecewise linear on the grid, the 1/p law below it, flat
    above it) or through its EPR fit (fit='epr', the paper's method; the fit sees the grid only).
    p is tabulated as a piecewise-constant density on CELLS equal cells of the support (cell
    averages of the curve by the trapezoid rule). Inverse-CDF sampling with linear interpolation
    of the CDF inside a cell draws exactly that p, so w = 1/p(t) is exactly unbiased.
    Options (the defaults keep it unbiased):
      support    'full': t in [0, 1]. 'grid': t in [t_grid[0], t_grid[-1]] only, with p normalised
                 there, so E[w f(t)] = int_{t_1}^{t_{T-1}} f: BIASED, a truncation of the ELBO
                 integral that drops its noisiest end (t < 1/T holds about a third of int m). The
                 paper's released sampler never draws t outside [1/T, 1 - 1/T]: this is that.
      mix        p_mix = (1 - mix) p + mix / |support|: still unbiased (w = 1/p_mix), bounds
                 w <= |support| / mix.
      max_weight w = min(1/p, max_weight): BIASED (under-weights the rarely drawn t) but bounds w.
    State: t_grid, sqrt_m, the settings and the fitted params (dict of floats; None for
    fit='none'); every update replaces tensors (never in place), so a state_dict is a snapshot.
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
    """Rebuild a sampler from its state_dict() alone, e.g. on resume; P-POTS gets its stored curve,
    fitted params and bins back without re-measuring or refitting, so it samples identically.
    A P-POTS state dict saved before the rename w_grid -> sqrt_m loads too."""
    if sd["name"] == "ppots":  # fit='none' is cheap; load_state_dict sets the rest
        sampler = PPOTSSampler(sd["t_grid"], torch.ones(len(sd["t_grid"])), fit="none")
    else:
        sampler = make_sampler(sd["name"])
    sampler.load_state_dict(sd)
    return sampler


# ----------------------------------------------------------------------------- behind the seam
# P-POTS's online refits (not in the paper) and its diagnostics: PPOTSCore is the whole method.
def curve_integrals(t_grid, sqrt_m, tail_cells=1024):
    """(int_0^1 m, int_0^1 √m) of the extended curve (extended_sqrt_m): uniform t's second moment
    and the square root of the optimum's (PPOTSCore). Exact on the grid (√m piecewise linear) and
    above it (flat); below t_grid[0] the midpoint rule on tail_cells cells."""
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
    predicted second moments (second_moments, describe). Its state adds the online bins sum_l2
    and count."""
    keys = PPOTSCore.keys + ("sum_l2", "count")

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.sum_l2, self.count = torch.zeros_like(self.t_grid), torch.zeros_like(self.t_grid)

    def observe(self, t, loss):
        """Online mode (not in the paper): bin the UNWEIGHTED training losses l at their t onto the
        nearest grid point, accumulating sum l^2 and counts. O(batch) per step, no extra forward
        pass. The l come from the current, changing model and from t ~ p rather than U(0,1); that
        is fine because each bin estimates the conditional moment m(t_j) = E[l^2 | t ≈ t_j]. t
        further than half a grid spacing beyond the grid's ends is ignored."""
        tg = self.t_grid
        edges = torch.cat([tg[:1] - (tg[1] - tg[0]) / 2, (tg[1:] + tg[:-1]) / 2,
                           tg[-1:] + (tg[-1] - tg[-2]) / 2])
        j = torch.bucketize(t.detach().double().cpu(), edges) - 1
        keep = (j >= 0) & (j < len(tg))
        self.sum_l2 = self.sum_l2.index_add(0, j[keep], loss.detach().double().cpu()[keep] ** 2)
        self.count = self.count.index_add(0, j[keep],
                                          torch.ones(int(keep.sum()), dtype=torch.float64))

    def refit_online(self):
        """Refit from the bins observed since the last refit: m(t_j) = sum l^2 / count; bins with
        no data keep the previous estimate. The bins are then emptied, so each refit sees the
        latest model."""
        seen = self.count > 0
        m = torch.where(seen, self.sum_l2 / self.count.clamp(min=1), self.sqrt_m ** 2)
        self.sqrt_m = m.sqrt()
        self.sum_l2, self.count = torch.zeros_like(self.t_grid), torch.zeros_like(self.t_grid)
        self._refit()

    def second_moments(self):
        """Predicted E_p[(w l)^2] = int p w^2 m (over the support; midpoint rule on FINE cells of
        [0, 1]) and the optimum (int √m)^2 of any unbiased t-law (PPOTSCore's argument), both
        relative to uniform's int m (curve_integrals). m is the extended curve (extended_sqrt_m):
        the 1/p tail below the grid is counted, not held flat."""
        u = (torch.arange(FINE, dtype=torch.float64) + 0.5) / FINE
        m, p = self.sqrt_m_at(u) ** 2, self.density(u)
        ours = torch.where(p > 0, p * self.weight(u).double() ** 2 * m, 0.0).mean().item()
        uniform, root = curve_integrals(self.t_grid, self.sqrt_m)
        return ours / uniform, root ** 2 / uniform

    def describe(self):
        """One line: the fit and the predicted ratio E_p[(w l)^2] / E_U[l^2]. That is a ratio of
        SECOND moments: unbiased samplers share the mean, so the variance falls by (1 - ratio)
        E_U[l^2]."""
        fitted = (" ".join(f"{k}={v:.3g}" for k, v in self.params.items()) if self.params
                  else "measured curve")
        support = ("" if self.support == "full"
                   else f" support=[{self.lo:.4g}, {self.hi:.4g}] (BIASED: truncated)")
        ours, best = self.second_moments()
        return (f"ppots fit={self.fit} ({fitted}) mix={self.mix} max_weight={self.max_weight}"
                f"{support}: E[(w l)^2] vs uniform x{ours:.3f} (optimum x{best:.3f})")
