"""Tests of the variance work (to be folded into test_all.py): the decomposition under StraTS, m's
tail below the P-POTS grid, support='grid', the x0 bootstrap, old state dicts, the figures.
Fixed seeds; tolerances from the Monte Carlo or binomial standard error (4 SE).
Run: python -m pytest -q test_variance_draft.py"""
import math

import numpy as np
import pytest
import torch

import figures
from data import get_task
from masking import EPS, MaskSpec, mask_rate
from model import ModelConfig, Transformer
from samplers import (PPOTSSampler, curve_integrals, epr_log_density, extended_sqrt_m,
                      make_sampler, measure_curve, sampler_from_state, tail_coefficients)
from variance import bootstrap_x0, decompose, draw_rates, measure

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning")

T = 70
T_GRID = torch.linspace(1 / T, 1 - 1 / T, T - 1, dtype=torch.float64)
N = 200_000


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def z_score(samples, truth):
    """Distance of the mean of `samples` from `truth`, in standard errors."""
    x = torch.tensor(samples, dtype=torch.float64)
    return ((x.mean() - truth).abs() / (x.std() / math.sqrt(len(x)))).item()


# ------------------------------------------------------------------------ decompose under StraTS
def test_decompose_with_marginal_rates_is_unbiased_under_strats_and_one_call_per_x0_is_not():
    """L_ijk = u_i + h(t_ij) + e_ijk with Var u = C, Var_{t~U(0,1)} h = B (h linear), Var e = A.
    One stratified sample(16) call per x0 (4 strata of 4) spreads an x0's t's evenly: the mean of
    h over them varies by only B/256, so the within-x0 spread of h is E[s2] = (16/15)(255/256) B
    = 1.0625 B, and C loses that B/16 too: both ~20 SE off over 400 repeats (measured 21, 22).
    draw_rates' i.i.d. marginal draws are unbiased (measured 0.5, 1.9 SE)."""
    A, B, C, a, b, c = 0.5, 1.0, 0.2, 32, 16, 2
    sampler, g = make_sampler("stratified"), gen(0)
    one_call_per_x0 = lambda: torch.stack([sampler.sample(b, g)[0] for _ in range(a)])
    marginal = lambda: draw_rates(sampler, a, b, g)[0]
    for draw, unbiased in ((marginal, True), (one_call_per_x0, False)):
        est = {"B": [], "C": []}
        for _ in range(400):
            t = draw().double()
            L = (math.sqrt(C) * torch.randn(a, 1, 1, generator=g, dtype=torch.float64)
                 + math.sqrt(12 * B) * (t - 0.5)[..., None]
                 + math.sqrt(A) * torch.randn(a, b, c, generator=g, dtype=torch.float64))
            r = decompose(L)
            est["B"].append(r["B"])
            est["C"].append(r["C"])
        z = {k: z_score(v, {"B": B, "C": C}[k]) for k, v in est.items()}
        assert all(v < 4 for v in z.values()) if unbiased else all(v > 4 for v in z.values()), z
    t, w = draw_rates(make_sampler("stratified"), 3, 5, gen(1))
    assert t.shape == w.shape == (3, 5) and (w == 1).all()


# ----------------------------------------------------------------------------- m below the grid
ALPHA, BETA = 1.0, 0.1


def synthetic_sqrt_m(t):
    return (ALPHA + BETA / mask_rate(t)).sqrt()


def closed_forms():
    """int_0^1 m and int_0^1 √m for m = alpha + beta / p, p = (1 - EPS) t + EPS: with p = s^2,
    int √(alpha + beta/p) dp = s √(alpha s^2 + beta) + beta/√alpha asinh(s √(alpha/beta))."""
    F = lambda s: s * math.sqrt(ALPHA * s * s + BETA) + BETA / math.sqrt(ALPHA) * math.asinh(
        s * math.sqrt(ALPHA / BETA))
    return (ALPHA + BETA * math.log(1 / EPS) / (1 - EPS),
            (F(1.0) - F(math.sqrt(EPS))) / (1 - EPS))


def test_tail_law_recovers_alpha_beta_and_integrals_match_closed_forms_where_flat_does_not():
    """m = alpha + beta/p measured on the T = 70 grid: the tail fit recovers (alpha, beta) and the
    extended int m, (int √m)^2 over [0, 1] match the closed forms. What remains is the linear
    interpolation of √m between grid points, h^2/12 |f'(t_1)| <= 0.2 % for √m and 0.5 % for m
    here (measured 0.2 % and 0.3 %): tolerance 1 %. Held flat below the grid (the old extension)
    int m misses 10 % and the optimum's ratio to it 7.9 % (the old code fails here)."""
    alpha, beta = tail_coefficients(T_GRID, synthetic_sqrt_m(T_GRID) ** 2)
    assert alpha == pytest.approx(ALPHA, rel=1e-9) and beta == pytest.approx(BETA, rel=1e-9)
    int_m, int_root = closed_forms()
    m, root = curve_integrals(T_GRID, synthetic_sqrt_m(T_GRID))
    assert m == pytest.approx(int_m, rel=1e-2)
    assert root ** 2 == pytest.approx(int_root ** 2, rel=1e-2)
    sampler = PPOTSSampler(T_GRID, synthetic_sqrt_m(T_GRID), fit="none")
    ours, best = sampler.second_moments()  # fit='none' follows √m, so it attains the optimum
    assert best == pytest.approx(int_root ** 2 / int_m, rel=1e-2)
    assert ours == pytest.approx(best, rel=1e-3)
    u = (torch.arange(2 ** 16, dtype=torch.float64) + 0.5) / 2 ** 16
    flat = torch.from_numpy(np.interp(u.numpy(), T_GRID.numpy(), synthetic_sqrt_m(T_GRID).numpy()))
    assert (flat ** 2).mean().item() < 0.92 * int_m  # the test has power: flat drops the tail


def test_tail_coefficients_stay_non_negative():
    """Noise can make the unconstrained fit negative: the extension must stay positive."""
    falling = torch.linspace(1.0, 3.0, T - 1, dtype=torch.float64)  # m rising with t: beta < 0
    alpha, beta = tail_coefficients(T_GRID, falling)
    assert beta == 0 and alpha > 0
    assert (extended_sqrt_m(T_GRID, falling.sqrt(), torch.tensor([0.0, 0.001])) > 0).all()


def test_fit_none_density_follows_sqrt_m_below_the_grid():
    """fit='none' draws t ∝ √m on all of [0, 1]: below t_1 its density follows the 1/p law (a flat
    extension would be constant there, off by √(p(t_1)/EPS) = 3.9 between 0 and t_1). The
    density is a trapezoid cell average, within 1 % of √m at the cell midpoints here."""
    sampler = PPOTSSampler(T_GRID, synthetic_sqrt_m(T_GRID), fit="none")
    u = (torch.arange(0, 58, dtype=torch.float64) + 0.5) / 4096  # cells below t_1 = 1/70
    ratio = sampler.density(u) / synthetic_sqrt_m(u)
    assert (ratio / ratio.mean() - 1).abs().max() < 1e-2


# ----------------------------------------------------------------------------- support='grid'
EPR = dict(a=2.0, b=0.5, A=0.3, kappa=1.5, r=1.2, q=3.0, m=2.5)


@pytest.mark.parametrize("fit", ["none", "epr"])
def test_grid_support_never_leaves_the_grid_and_estimates_the_truncated_integral(fit):
    """support='grid' (the paper's released sampler): t only in [t_1, t_{T-1}], w = 1/p normalised
    there, so E[w f] = int_{t_1}^{t_{T-1}} f: BIASED for [0, 1] (f = t^2: 0.3192 against 1/3,
    ~20 SE at N = 200,000), within 4 SE of the truncated integral."""
    curve = epr_log_density(T_GRID, **{k: torch.tensor(v, dtype=torch.float64)
                                      for k, v in EPR.items()}).exp()
    sampler = PPOTSSampler(T_GRID, curve, fit=fit, support="grid")
    t, w = sampler.sample(N, gen(0))
    assert t.double().min() >= T_GRID[0] and t.double().max() <= T_GRID[-1]
    assert t.double().min() < T_GRID[0] + 1e-3 and t.double().max() > T_GRID[-1] - 1e-3
    y = w.double() * t.double() ** 2
    mean, se = y.mean().item(), y.std().item() / math.sqrt(N)
    lo, hi = T_GRID[0].item(), T_GRID[-1].item()
    assert abs(mean - (hi ** 3 - lo ** 3) / 3) < 4 * se
    assert abs(mean - 1 / 3) > 4 * se
    assert "BIASED" in sampler.describe()
    assert sampler_from_state(sampler.state_dict()).support == "grid"


# ----------------------------------------------------------------------------- state dicts
def test_old_state_dict_with_w_grid_still_loads():
    """Checkpoints saved before the rename w_grid -> sqrt_m (and before `support`) resume."""
    sampler = PPOTSSampler(T_GRID, synthetic_sqrt_m(T_GRID), fit="none", mix=0.1)
    sd = sampler.state_dict()
    old = {("w_grid" if k == "sqrt_m" else k): v for k, v in sd.items() if k != "support"}
    rebuilt = sampler_from_state(old)
    assert torch.equal(rebuilt.sqrt_m, sampler.sqrt_m) and rebuilt.support == "full"
    draws = lambda s: s.sample(1000, gen(3))
    assert all(torch.equal(x, y) for x, y in zip(draws(sampler), draws(rebuilt)))
    assert "sqrt_m" in sd and "w_grid" not in sd


# ----------------------------------------------------------------------------- x0 bootstrap
def test_x0_bootstrap_of_decompose_covers_the_truth_at_the_nominal_rate():
    """200 repeats of L_ijk = alpha_i + beta_ij + eps_ijk (C = 1, B = 0.5, A = 2; 64 x0 x 4 t x
    2 masks), 500 resamples each: each 95 % interval must cover its truth in >= 95 % - 4 SE
    (binomial SE over 200 repeats: 1.5 %) = 88.8 % of repeats (measured: 94-97 %)."""
    truth = dict(C=1.0, B=0.5, A=2.0, total=3.5)
    R, a, b, c = 200, 64, 4, 2
    g = gen(0)
    hits = dict.fromkeys(truth, 0)
    for r in range(R):
        L = (torch.randn(a, 1, 1, generator=g) + math.sqrt(0.5) * torch.randn(a, b, 1, generator=g)
             + math.sqrt(2.0) * torch.randn(a, b, c, generator=g))
        ci = bootstrap_x0(lambda comps, idx: comps["L"], {"L": L}, n_boot=500, seed=r)
        for k in truth:
            hits[k] += ci[k]["lo"] <= truth[k] <= ci[k]["hi"]
    assert all(h / R >= 0.95 - 4 * math.sqrt(0.95 * 0.05 / R) for h in hits.values()), hits


def test_paired_ratio_resamples_the_same_x0_in_both():
    """A of 2L over A of L is 4 on every resample only if both take the same x0 rows; an
    independent array of the same law gives a wide interval."""
    L = torch.randn(16, 3, 2, generator=gen(0))
    ratio = lambda comps, idx: comps["num"]["A"] / comps["den"]["A"]
    paired = bootstrap_x0(ratio, {"num": 2 * L, "den": L}, n_boot=500)
    assert paired["est"] == pytest.approx(4) and paired["hi"] - paired["lo"] < 1e-9
    other = bootstrap_x0(ratio, {"num": 2 * torch.randn(16, 3, 2, generator=gen(1)), "den": L},
                         n_boot=500)
    assert other["hi"] - other["lo"] > 1
    with pytest.raises(ValueError, match="same x0s"):
        bootstrap_x0(ratio, {"num": L, "den": L[:8]})


def tiny_net(causal=False):
    torch.manual_seed(0)
    return Transformer(ModelConfig(n_layer=1, n_head=2, n_embd=32, causal=causal))


def test_curve_and_measure_with_the_same_seed_see_the_same_x0s():
    """variance.py pairs P-POTS's measured total with the floor from a curve on the same x0s: both
    draw their x0s first from the generator. An ARM's loss is a function of x0 alone, so the two
    draw arrays must agree x0 by x0."""
    task, model = get_task("sort", num_digits=4), tiny_net(causal=True)
    curve = measure_curve(model, task, T=4, n_x0=6, n_masks=2, generator=gen(5), keep_draws=True)
    res = measure(model, task, None, MaskSpec(), 6, 2, 2, generator=gen(5), n_batches=2,
                  keep_draws=True)
    assert curve["draws"].shape == (6, 3, 2)
    assert torch.allclose(curve["draws"][:, 0, 0], res["draws"][:, 0, 0], rtol=1e-6)
    assert not torch.allclose(res["draws"][:, 0, 0], res["draws"][:, 0, 0].mean())


@pytest.mark.parametrize("target", ["loss", "grad"])
def test_measure_keeps_draws_that_decompose_to_its_components(target):
    task = get_task("sort", num_digits=4)
    res = measure(tiny_net(), task, make_sampler("stratified"), MaskSpec("mirror"), 4, 3, 2,
                  target=target, generator=gen(0), n_batches=2, n_proj=2, keep_draws=True)
    assert res["draws"].shape == ((4, 3, 2) if target == "loss" else (4, 3, 2, 2))
    again = decompose(res["draws"])
    assert all(again[k] == pytest.approx(res[k], rel=1e-12) for k in ("A", "B", "C", "total"))
    assert "draws" not in measure(tiny_net(), task, make_sampler("uniform"), MaskSpec(), 4, 3, 2,
                                  generator=gen(0), n_batches=2)


# ----------------------------------------------------------------------------- figures
def test_each_figure_writes_a_png(tmp_path):
    sampler = PPOTSSampler(T_GRID, synthetic_sqrt_m(T_GRID), fit="none", support="grid")
    res = lambda s: dict(A=0.4 * s, B=0.05 * s, C=-0.001 * s)
    curve = dict(t=T_GRID.float(), m=synthetic_sqrt_m(T_GRID).float() ** 2,
                 g=torch.ones(T - 1), v=1 / T_GRID.float())
    calls = {"ppots.png": lambda p: figures.plot_ppots(sampler, p),
             "variance.png": lambda p: figures.plot_variance(
                 [{"iter": i, "loss": res(1), "grad": res(i)} for i in (0, 250, 500)], p),
             "components.png": lambda p: figures.plot_components(
                 {"standard": curve, "pair": curve, "mirror": curve}, p)}
    for name, plot in calls.items():
        plot(tmp_path / name)
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
