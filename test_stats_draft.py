"""Tests of stats.py (to be folded into test_all.py): fixed seeds, tolerances from the binomial or
Monte Carlo standard error. Run: python -m pytest -q test_stats_draft.py"""
import math

import numpy as np
import pytest

import stats


def _arms(rng, n, shift=0.0, noise=0.3):
    """Arms on n paired seeds: a shared per-seed effect plus independent noise; a moved by shift."""
    base = rng.normal(size=n)
    return base + shift + rng.normal(0, noise, n), base + rng.normal(0, noise, n)


def test_identical_arms_not_detected():
    # Nominal: the 95 % CI covers 0 in 95 % of repeats, and p >= 0.05 in >= 95 % (the sign-flip
    # test is exact). Over R = 1000 repeats the binomial SE is sqrt(.95 * .05 / R) = 0.0069:
    # coverage alone must be >= 0.95 - 4 SE = 0.922 (measured 0.948; the plain, unexpanded
    # percentile interval covers 0.897 here and fails). Both together: the two failures are nearly
    # the same event (a large |mean(a - b)|), so the joint rate is near 95 % too (measured 0.945);
    # the issue's >= 0.90 is 95 % - 7 SE, and also holds by the union bound (1 - 2 x 5 %).
    R, n = 1000, 10
    covered = both = 0
    for r in range(R):
        d = stats.paired_difference(*_arms(np.random.default_rng(1000 + r), n), n_boot=1000, seed=r)
        covered += d["lo"] <= 0 <= d["hi"]
        both += d["lo"] <= 0 <= d["hi"] and d["p"] >= 0.05
    se = math.sqrt(0.95 * 0.05 / R)
    assert covered / R >= 0.95 - 4 * se
    assert both / R >= 0.90


def test_shifted_arm_detected():
    a, b = _arms(np.random.default_rng(0), 10, shift=5 * 0.3 * math.sqrt(2))  # 5 paired SDs
    d = stats.paired_difference(a, b, n_boot=1000)
    assert 0 < d["lo"] <= d["diff"] <= d["hi"] and d["p"] < 0.05
    assert d["diff"] == pytest.approx(np.mean(a - b))
    assert stats.verdict(d["lo"], d["hi"], "higher") == "holds"
    assert stats.verdict(d["lo"], d["hi"], "lower") == "contradicted"
    e = stats.paired_difference(b, a, n_boot=1000)
    assert stats.verdict(e["lo"], e["hi"], "lower") == "holds"
    assert stats.verdict(-0.1, 0.2, "higher") == "not detectable"
    assert stats.verdict(-0.1, 0.2, "lower") == "not detectable"


def test_permutation_exact_by_hand():
    # d = (1, 2, 3): sign-pattern sums 6, 0, 2, -4, 4, -2, 0, -6; |sum| >= 6 for 2 of 8 patterns.
    assert stats.permutation_p([1, 2, 3], [0, 0, 0]) == 0.25
    # d = (.1, .2, .3, -.4): |sum| = 0.2; flipping the signs of a subset F of (1, 2, 3, 4) x 0.1
    # gives sum 1 - 0.2 sum(F), so |sum| < 0.2 only for sum(F) = 5: F = {1, 4} or {2, 3}.
    # p = 14/16, with the ties (|sum| = 0.2 exactly, up to float rounding) counted as hits.
    assert stats.permutation_p([0.1, 0.2, 0.3, 0.0], [0, 0, 0, 0.4]) == 0.875
    assert stats.permutation_p([1.0, 2.0], [1.0, 2.0]) == 1.0


def test_permutation_monte_carlo_matches_exact():
    a, b = _arms(np.random.default_rng(3), 12, shift=0.15)
    exact = stats.permutation_p(a, b, n_perm=2 ** 12)
    assert 0.05 < exact < 0.95
    n_perm = 2000  # < 2^12: Monte Carlo; SE sqrt(p (1 - p) / n_perm), plus the +1 correction's bias
    mc = stats.permutation_p(a, b, n_perm=n_perm, seed=1)
    assert mc != exact and (mc * (n_perm + 1)) == pytest.approx(round(mc * (n_perm + 1)))
    assert abs(mc - exact) <= 4 * math.sqrt(exact * (1 - exact) / n_perm) + 1 / (n_perm + 1)


def test_std_ratio():
    # Identical spreads, paired by seed, n = 10: nominal coverage of 1 is 95 % (measured 0.955);
    # R = 200, SE = sqrt(.95 * .05 / 200) = 0.0154, so >= 0.90 leaves 3 SE.
    R, n = 200, 10
    covered = 0
    for r in range(R):
        a, b = _arms(np.random.default_rng(2000 + r), n, noise=1.0)
        s = stats.std_ratio(a, b, n_boot=1000, seed=r)
        covered += s["lo"] <= 1 <= s["hi"]
    assert covered / R >= 0.95 - 3 * math.sqrt(0.95 * 0.05 / R)
    # a with 4x the spread: at n = 20 the CI excluded 1 in 1000 of 1000 repeats; a power of 0.99
    # would still give >= 0.99 - 4 sqrt(.99 * .01 / 200) = 0.96 of 200. (At n = 10 only ~0.90.)
    excluded = 0
    for r in range(R):
        rng = np.random.default_rng(3000 + r)
        s = stats.std_ratio(rng.normal(0, 4, 20), rng.normal(0, 1, 20), n_boot=1000, seed=r)
        excluded += s["lo"] > 1
    assert excluded / R >= 0.95
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 1.0, 1.0, 2.0])
    s = stats.std_ratio(a, b, n_boot=1000)  # b is tied on most resamples: those are dropped
    assert s["ratio"] == pytest.approx(a.std(ddof=1) / b.std(ddof=1))
    assert np.isfinite([s["lo"], s["hi"]]).all()


def test_bootstrap_dict_and_coverage():
    x = np.random.default_rng(4).normal(size=30)
    out = stats.bootstrap(lambda i: dict(mean=x[i].mean(), sd=x[i].std()), 30, n_boot=500)
    assert set(out) == {"mean", "sd"}
    assert out["mean"]["est"] == pytest.approx(x.mean())
    assert out["sd"]["est"] == pytest.approx(x.std())
    assert all(v["lo"] < v["est"] < v["hi"] for v in out.values())
    # The same resamples as paired_difference for the same (n, n_boot, seed)
    a, b = _arms(np.random.default_rng(5), 8)
    d = stats.paired_difference(a, b, n_boot=500, seed=7)
    m = stats.bootstrap(lambda i: (a - b)[i].mean(), 8, n_boot=500, seed=7)
    assert (m["lo"], m["hi"]) == pytest.approx((d["lo"], d["hi"]))
    # Coverage of a normal mean (mean 1, n = 15): nominal 0.95, R = 200, tolerance 4 binomial SE
    R, covered = 200, 0
    for r in range(R):
        y = np.random.default_rng(4000 + r).normal(1.0, 1.0, 15)
        ci = stats.bootstrap(lambda i: y[i].mean(), 15, n_boot=500, seed=r)
        covered += ci["lo"] <= 1.0 <= ci["hi"]
    assert abs(covered / R - 0.95) <= 4 * math.sqrt(0.95 * 0.05 / R)


def test_t_quantile_and_format():
    for df, t in [(1, 12.7062), (2, 4.3027), (9, 2.2622), (30, 2.0423), (10 ** 6, 1.9600)]:
        assert stats._t_quantile(0.975, df) == pytest.approx(t, abs=2e-4)
    d = dict(diff=0.061, lo=-0.012, hi=0.134, p=0.41)
    assert stats.fmt_diff(d) == "+0.061 [\u22120.012, +0.134], p = 0.41"


@pytest.mark.parametrize("call, match", [
    (lambda: stats.paired_difference([1, 2, 3], [1, 2]), "lengths 3 and 2"),
    (lambda: stats.paired_difference([1], [2]), "n >= 2"),
    (lambda: stats.permutation_p([1, 2], [1, float("nan")]), "finite"),
    (lambda: stats.permutation_p([1, 2], [3, 4], n_perm=0), "n_perm"),
    (lambda: stats.std_ratio([[1, 2]], [[1, 2]]), "1-D"),
    (lambda: stats.std_ratio([1, 2, 3], [2, 2, 2]), "std\\(b\\) is 0"),
    (lambda: stats.bootstrap(lambda i: 0.0, 1), "n >= 2"),
    (lambda: stats.bootstrap(lambda i: float("nan"), 5), "nan on every"),
    (lambda: stats.paired_difference([1, 2], [3, 5], level=95), "level"),
    (lambda: stats.paired_difference([1, 2], [3, 5], n_boot=0), "n_boot"),
    (lambda: stats.verdict(0.1, 0.2, claim="better"), "claim"),
    (lambda: stats.verdict(0.3, 0.2), "lo <= hi"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
