"""Masking-rate (t) samplers for MDM training: uniform, stratified (StraTS), clipped and P-POTS.

The MDM loss is L = int_0^1 E[l | t] dt (l = masking.row_losses). A sampler draws t_1..t_n with
weights w_i and train.py minimises mean_i w_i l(t_i). It is unbiased when E[w f(t)] = int_0^1 f(t) dt
for every f, i.e. when the weighted loss estimates L itself.

    sampler = make_sampler("stratified")          # P-POTS: build_ppots(model, task)
    t, w = sampler.sample(batch_size, generator)  # FloatTensor[n] each, CPU
    loss = (w * row_losses(model, x0, eligible, t.to(device), masking)).mean()

P-POTS (the paper's Pareto-optimal t-sampler): draw t ~ p, weight w = 1/p(t). With
m(t) = E[l^2 | t] = g(t)^2 + v(t) (g = E[l | t], v = Var[l | t], both over x0 and masks), the second
moment of the estimate is E_p[(l/p)^2] = int m/p. Over densities with int p = 1 it is minimised by
p*(t) ∝ √m(t): by Cauchy–Schwarz (int √m)^2 = (int √(m/p) √p)^2 <= int (m/p) · int p = int m/p, with
equality iff p ∝ √m. The minimal second moment is (int √m)^2, against int m for uniform t; every
unbiased p has the same mean L, so the variance drops by exactly as much as the second moment.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from configurator import fail
from masking import MaskSpec, draw_masks, row_losses

CELLS = 4096  # P-POTS tabulates p on 4096 equal cells of [0, 1]
EPR_NAMES = ("a", "b", "A", "kappa", "r", "q", "m")


class Sampler:
    """Interface: sample(n, generator) -> (t, w). The state is `name` plus the attributes in `keys`
    (plain python values and tensors, so a weights_only checkpoint can hold it)."""
    name, keys = None, ()

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
    each stratum expects n/k draws and the estimate stays unbiased (in expectation over that choice).
    k = None uses k = ceil(√n); k = n (the batch size) gives exactly one draw per stratum, t_i = (i + u_i)/n.
    The draws are shuffled so that no row of a batch is tied to a stratum.
    """
    name, keys = "stratified", ("k",)

    def __init__(self, k=None):
        self.k = k

    def sample(self, n, generator=None):
        k = self.k or math.ceil(math.sqrt(n))
        per, extra = divmod(n, k)
        strata = torch.cat([torch.arange(k).repeat(per), torch.randperm(k, generator=generator)[:extra]])
        t = (strata + torch.rand(n, generator=generator)) / k
        return t[torch.randperm(n, generator=generator)], torch.ones(n)


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
            fail(f"clipped sampler needs 0 <= lo < hi <= 1, got lo={lo}, hi={hi}")
        self.lo, self.hi = lo, hi

    def sample(self, n, generator=None):
        return self.lo + (self.hi - self.lo) * torch.rand(n, generator=generator), torch.ones(n)


def epr_params(theta):
    """Unconstrained theta[7] -> EPR parameters: a, b, A, kappa, r, q = softplus > 0; m = 1 + softplus > 1."""
    sp = F.softplus(theta)
    return dict(zip(EPR_NAMES, (*sp[:6], 1 + sp[6])))


def epr_log_density(t, a, b, A, kappa, r, q, m):
    """log of the unnormalised EPR density p(t) ∝ √(a t^r + b (1-t)^q + A^2 exp(2 kappa t^m)),
    summed in log space so that exp(2 kappa t^m) cannot overflow."""
    terms = torch.stack([a.log() + torch.xlogy(r, t), b.log() + torch.xlogy(q, 1 - t),
                         2 * A.log() + 2 * kappa * t ** m])
    return 0.5 * torch.logsumexp(terms, 0)


def log_normalise(log_p, t):
    """log p - log int p (trapezoid rule on the grid t), with the max taken out before exponentiating."""
    top = log_p.max()
    return log_p - top - torch.trapezoid((log_p - top).exp(), t).log()


def fit_epr(t_grid, w_grid, n_starts=20, seed=0, max_iter=100):
    """Fit the EPR family to the measured w = √m: argmin KL(w || p) on the grid, both normalised by the
    trapezoid rule. Multi-start: n_starts random starts (fixed seed), each run through L-BFGS; the
    lowest KL wins. Returns the parameters as a dict of python floats."""
    t = t_grid.double()
    w_hat = w_grid.double() / torch.trapezoid(w_grid.double(), t)

    def kl(theta):
        log_p = log_normalise(epr_log_density(t, **epr_params(theta)), t)
        return torch.trapezoid(torch.xlogy(w_hat, w_hat) - w_hat * log_p, t).nan_to_num(math.inf)

    def polish(theta):
        theta = theta.clone().requires_grad_()
        lbfgs = torch.optim.LBFGS([theta], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            lbfgs.zero_grad()
            loss = kl(theta)
            loss.backward()
            return loss

        lbfgs.step(closure)
        return theta.detach()

    starts = torch.randn(n_starts, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    best = min((polish(theta) for theta in starts), key=kl)
    if not kl(best) < math.inf:
        fail("the EPR fit diverged from every start; use fit='none' or more n_starts")
    return {k: v.item() for k, v in epr_params(best).items()}


class PPOTSSampler(Sampler):
    """P-POTS: t ~ p(t), weight 1/p(t), with p ∝ the measured w = √m on t_grid (w_grid: the paper's w(t),
    not the weight) taken as is (fit='none': piecewise linear in t, flat beyond the grid, as the paper's
    released code does) or through its EPR fit (fit='epr', the paper's method).

    p is tabulated as a piecewise-constant density on CELLS equal cells of [0, 1] (cell averages of the
    curve by the trapezoid rule). Inverse-CDF sampling with linear interpolation of the CDF inside a
    cell draws exactly that p, so w = 1/p(t) is exactly unbiased.
    Options (defaults keep it unbiased):
      mix        p_mix = (1 - mix) p + mix: still unbiased (w = 1/p_mix) and bounds w <= 1/mix.
      max_weight w = min(1/p, max_weight): BIASED (under-weights the rarely drawn t) but bounds w.
    State: t_grid, w_grid, the settings, the fitted params (dict of floats; None for fit='none') and
    the online bins; every update replaces tensors (never in place), so a state_dict is a snapshot.
    """
    name = "ppots"
    keys = ("t_grid", "w_grid", "fit", "n_starts", "seed", "max_weight", "mix", "params", "sum_l2", "count")

    def __init__(self, t_grid, w_grid, fit="epr", n_starts=20, seed=0, max_weight=None, mix=0.0):
        if fit not in ("epr", "none"):
            fail(f"unknown P-POTS fit {fit!r}; choose 'epr' or 'none'")
        if not 0 <= mix <= 1:
            fail(f"P-POTS mix must be in [0, 1], got {mix}")
        self.t_grid = torch.as_tensor(t_grid, dtype=torch.float64)
        self.w_grid = torch.as_tensor(w_grid, dtype=torch.float64)
        self.fit, self.n_starts, self.seed, self.max_weight, self.mix = fit, n_starts, seed, max_weight, mix
        self.sum_l2, self.count = torch.zeros_like(self.t_grid), torch.zeros_like(self.t_grid)
        self._refit()

    def _refit(self):
        self.params = fit_epr(self.t_grid, self.w_grid, self.n_starts, self.seed) if self.fit == "epr" else None
        self._tabulate()

    def _tabulate(self):
        u = torch.linspace(0, 1, CELLS + 1, dtype=torch.float64)
        if self.fit == "epr":
            params = {k: torch.tensor(v, dtype=torch.float64) for k, v in self.params.items()}
            curve = log_normalise(epr_log_density(u, **params), u).exp()
        else:
            curve = self.measured_w(u)
        cdf = F.pad(torch.cumulative_trapezoid(curve, u), (1, 0))
        self.cdf = (1 - self.mix) * cdf / cdf[-1] + self.mix * u
        self.p = self.cdf.diff() * CELLS  # the density on each cell

    def load_state_dict(self, sd):
        super().load_state_dict(sd)
        self._tabulate()

    def measured_w(self, t):
        """The measured w = √m at t (float64): piecewise linear on t_grid, flat beyond it."""
        return torch.from_numpy(np.interp(t.double().numpy(), self.t_grid.numpy(), self.w_grid.numpy()))

    def density(self, t):
        """The normalised density p(t) that sample() draws from (float64)."""
        return self.p[(t.double() * CELLS).long().clamp(max=CELLS - 1)]

    def weight(self, t):
        """w(t) = 1/p(t), capped at max_weight if set."""
        w = 1 / self.density(t)
        return (w if self.max_weight is None else w.clamp(max=self.max_weight)).float()

    def sample(self, n, generator=None):
        """Inverse CDF: u ~ U(0,1); the cell i with cdf[i] <= u < cdf[i+1] by searchsorted, then linear
        interpolation inside it. w is evaluated at the returned (float32) t."""
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        i = torch.searchsorted(self.cdf, u, right=True) - 1
        t = ((i + (u - self.cdf[i]) / (self.cdf[i + 1] - self.cdf[i])) / CELLS).float()
        return t, self.weight(t)

    def observe(self, t, loss):
        """Online mode (not in the paper): bin the UNWEIGHTED training losses l at their t onto the
        nearest grid point, accumulating sum l^2 and counts. O(batch) per step, no extra forward pass.
        The l come from the current, changing model and from t ~ p rather than U(0,1); that is fine
        because each bin estimates the conditional moment m(t_j) = E[l^2 | t ≈ t_j]. t further than
        half a grid spacing beyond the grid's ends is ignored."""
        tg = self.t_grid
        edges = torch.cat([tg[:1] - (tg[1] - tg[0]) / 2, (tg[1:] + tg[:-1]) / 2, tg[-1:] + (tg[-1] - tg[-2]) / 2])
        j = torch.bucketize(t.detach().double().cpu(), edges) - 1
        keep = (j >= 0) & (j < len(tg))
        self.sum_l2 = self.sum_l2.index_add(0, j[keep], loss.detach().double().cpu()[keep] ** 2)
        self.count = self.count.index_add(0, j[keep], torch.ones(int(keep.sum()), dtype=torch.float64))

    def refit_online(self):
        """Refit from the bins observed since the last refit: m(t_j) = sum l^2 / count; bins with no data
        keep the previous estimate. The bins are then emptied, so each refit sees the latest model."""
        seen = self.count > 0
        m = torch.where(seen, self.sum_l2 / self.count.clamp(min=1), self.w_grid ** 2)
        self.w_grid = m.sqrt()
        self.sum_l2, self.count = torch.zeros_like(self.t_grid), torch.zeros_like(self.t_grid)
        self._refit()

    def second_moments(self):
        """Predicted E_p[(w l)^2] = int p w^2 m and its optimum (int √m)^2, both relative to uniform's int m;
        integrals over [0, 1] by the midpoint rule on the cells, with m = measured_w^2 (flat beyond the grid)."""
        u = (torch.arange(CELLS, dtype=torch.float64) + 0.5) / CELLS
        m = self.measured_w(u) ** 2
        ours = (self.density(u) * self.weight(u).double() ** 2 * m).mean()
        return (ours / m.mean()).item(), (m.sqrt().mean() ** 2 / m.mean()).item()

    def describe(self):
        """One line: the fit and the predicted ratio E_p[(w l)^2] / E_U[l^2]. That is a ratio of SECOND
        moments: unbiased samplers share the mean, so the variance falls by (1 - ratio) E_U[l^2]."""
        fitted = " ".join(f"{k}={v:.3g}" for k, v in self.params.items()) if self.params else "measured curve"
        ours, best = self.second_moments()
        return (f"ppots fit={self.fit} ({fitted}) mix={self.mix} max_weight={self.max_weight}: "
                f"E[(w l)^2] vs uniform x{ours:.3f} (optimum x{best:.3f})")

    def plot(self, path):
        """Save a PNG: measured √m(t_j) (scaled as a density), the sampler's p(t), and uniform."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        u = torch.linspace(0, 1, CELLS + 1, dtype=torch.float64)
        scale = torch.trapezoid(self.density(self.t_grid), self.t_grid) / torch.trapezoid(self.w_grid, self.t_grid)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.t_grid, self.w_grid * scale, "o", ms=3, label="measured √m(t) (as a density)")
        ax.plot(u, self.density(u), label=f"P-POTS p(t) (fit={self.fit})")
        ax.axhline(1.0, color="gray", ls="--", label="uniform")
        ours, best = self.second_moments()
        ax.set(xlabel="t", ylabel="density", title=f"E[(w l)^2] vs uniform x{ours:.3f} (optimum x{best:.3f})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


@torch.no_grad()
def measure_curve(model, task, masking=MaskSpec(), T=70, n_x0=32, n_masks=4, generator=None, batch_rows=2048,
                  forward_rows=512):
    """Measure m(t_j) = E[l^2 | t_j] on t_j = linspace(1/T, 1 - 1/T, T - 1) with n_x0 training examples
    and n_masks masks each: (T - 1) n_x0 n_masks rows, in eval mode (the model's training flag is restored
    afterwards). For P-POTS, w(t) = √m(t). The masks are drawn batch_rows rows at a time (pair's draws depend
    on it, so it stays fixed) and the model runs on forward_rows rows at a time (the result does not depend on
    it; 512 rows are faster than 2,048 on a CPU's caches: bench.py's 'P-POTS measure').

    m is the plain mean of l^2 over all n_x0 * n_masks draws: unbiased for E_x0[g(x0,t)^2 + v(x0,t)],
    so it includes the spread of g across x0. (Identity: mean l^2 = mean_x0(g^2 + v (n-1)/n) with g, v the
    per-x0 sample mean and unbiased variance over n = n_masks masks; mean_x0(g^2 + v) would overstate m
    by v/n.) The paper's released code uses g^2 + v of the x0-averaged mean g, which drops Var_x0(g).
    Returns dict(t, m, g = mean_x0 g, v = mean_x0 v), float32 tensors of length T - 1.
    """
    if n_masks < 2:
        fail(f"measure_curve needs n_masks >= 2 (for the variance over masks), got {n_masks}")
    t_grid = torch.linspace(1 / T, 1 - 1 / T, T - 1)
    x0, eligible = task.batch(n_x0, "train", generator)
    rows = lambda z: z.repeat_interleave(n_masks, 0).repeat(T - 1, 1)  # rows ordered (t, x0, mask)
    x0, eligible, t = rows(x0), rows(eligible), t_grid.repeat_interleave(n_x0 * n_masks)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    l = []
    for i in range(0, len(t), batch_rows):
        x, e, tt = (z[i:i + batch_rows].to(device) for z in (x0, eligible, t))
        masks = None if model.config.causal else draw_masks(e, tt, masking, generator)
        for j in range(0, len(tt), forward_rows):
            rows_j = slice(j, j + forward_rows)
            l.append(row_losses(model, x[rows_j], e[rows_j], tt[rows_j], masking,
                                masks=None if masks is None else tuple(m[rows_j] for m in masks)).cpu())
    l = torch.cat(l)
    model.train(was_training)
    l = l.view(T - 1, n_x0, n_masks)
    return dict(t=t_grid, m=(l ** 2).mean((1, 2)), g=l.mean((1, 2)), v=l.var(2).mean(1))


def build_ppots(model, task, masking=MaskSpec(), generator=None, T=70, n_x0=32, n_masks=4, **kw):
    """Measure the curve (measure_curve) and return PPOTSSampler(t, √m, **kw)."""
    curve = measure_curve(model, task, masking, T, n_x0, n_masks, generator)
    return PPOTSSampler(curve["t"], curve["m"].sqrt(), **kw)


SAMPLERS = {"uniform": UniformSampler, "stratified": StratifiedSampler, "clipped": ClippedSampler,
            "ppots": PPOTSSampler}


def make_sampler(name, **kw):
    """A sampler by name: uniform, stratified (k=), clipped (lo=, hi=), ppots (t_grid=, w_grid=, ...)."""
    if name not in SAMPLERS:
        fail(f"unknown t-sampler {name!r}; choose from {sorted(SAMPLERS)}")
    return SAMPLERS[name](**kw)


def sampler_from_state(sd):
    """Rebuild a sampler from its state_dict() alone, e.g. on resume; P-POTS gets its stored curve,
    fitted params and bins back without re-measuring or refitting, so it samples identically."""
    if sd["name"] == "ppots":
        sampler = PPOTSSampler(sd["t_grid"], sd["w_grid"], fit="none")  # cheap; load_state_dict sets the rest
    else:
        sampler = make_sampler(sd["name"])
    sampler.load_state_dict(sd)
    return sampler
