"""The statistics every method comparison uses: bootstrap CIs, permutation tests, Holm, the verdict
rule, and the power of the std test.

Arms (training methods) are run on the same seeds 0..n-1 and compared paired by seed: the unit of
resampling is the seed, and a and b are resampled together (the same indices for both). What a
seed holds fixed across arms is the study's to say (study.Study.pairing): from scratch, the init
and the stream of training examples; in fine-tuning, the stream only. For variance components the
unit is the x0 row: bootstrap() resamples any n units and evaluates an arbitrary stat(idx) on them.

    bootstrap          stat(arange(n)) and its expanded percentile interval (below)
    paired_difference  mean(a - b), its bootstrap CI, and permutation_p's p-value
    permutation_p      two-sided sign-flip test of mean(a - b) = 0 (exact for small n)
    std_ratio          std(a) / std(b) (ddof 1), its paired bootstrap CI, and std_permutation_p's p
    std_permutation_p  two-sided within-seed label-swap test of std(a) = std(b), on centred arms
    holm               Holm's step-down adjusted p-values of a family
    verdict            the rule: the CI and the test must agree; 'untestable at n = k' otherwise
    at_bound           'at ceiling' / 'at floor': a std ratio that the bounds of accuracy decide
    std_power          the simulated power of the std rule on normal data, with its Monte Carlo SE

The interval is the percentile interval of the bootstrap draws, expanded for small n (Hesterberg,
"What teachers should know about the bootstrap", 2015): for level 1 - alpha it takes the percentiles
q and 1 - q of the draws, q = Phi(-sqrt(n / (n - 1)) * t_{n-1, 1-alpha/2}), instead of alpha/2.
This undoes the two ways the plain percentile interval of a mean is too narrow (the plug-in sd and
the normal instead of the t quantile): at n = 10 seeds its 95 % interval covers the true mean in
~90 % of normal samples, the expanded one in ~95 %. q -> alpha/2 as n grows (at 95 % and 64 x0
rows, q = 0.022 instead of 0.025).

The rule (verdict). A difference is called higher or lower only when its CI excludes 0 (a ratio's:
1) on that side AND its test's p-value, Holm-adjusted over its family, is below alpha. Both exact
tests here have smallest possible p 2^(1 - n) (the identity and the full flip), and Holm multiplies
the smallest p of a family of m tests by m, so when m 2^(1 - n) >= alpha no outcome can pass:
the verdict is 'untestable at n = k' (at alpha = 0.05 and m = 1: n <= 5 seeds).
"""
import functools
import math

import numpy as np

N_BOOT, N_PERM = 4000, 10000  # the default bootstrap resamples and permutation patterns

def _pair(a, b):
    """a, b as float arrays; ValueError unless they are finite, 1-D, of equal length n >= 2."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"a and b must be 1-D sequences, got shapes {a.shape} and {b.shape}")
    if len(a) != len(b):
        raise ValueError(f"a and b must be paired by seed, got lengths {len(a)} and {len(b)}")
    if len(a) < 2:
        raise ValueError(f"need n >= 2 paired values, got n = {len(a)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("a and b must be finite (no nan or inf)")
    return a, b


def _t_quantile(p, df):
    """Quantile p >= 0.5 of Student's t with df degrees of freedom. T = sqrt(df) tan(theta), where
    theta has density proportional to cos(theta)^(df - 1) on (-pi/2, pi/2), integrated here by the
    trapezoid rule. df is capped at 10^5, where t and the normal quantile differ by < 1e-4."""
    df = min(df, 100_000)
    theta = np.linspace(0.0, math.pi / 2, 100_001)
    dens = np.cos(theta) ** (df - 1)
    cdf = np.concatenate([[0.0], np.cumsum(dens[1:] + dens[:-1])])
    return math.sqrt(df) * math.tan(np.interp(p, 0.5 + 0.5 * cdf / cdf[-1], theta))


@functools.lru_cache(maxsize=None)
def _tail(n, level):
    """q = Phi(-sqrt(n / (n - 1)) * t_{n-1, (1+level)/2}): the lower percentile of the interval."""
    z = math.sqrt(n / (n - 1)) * _t_quantile(0.5 + level / 2, n - 1)
    return 0.5 * math.erfc(z / math.sqrt(2))


def _interval(est, draws, n, level):
    """dict(est=, lo=, hi=): lo, hi the percentiles q, 1 - q of the draws (nan draws dropped)."""
    draws = np.asarray(draws, dtype=float)
    draws = draws[~np.isnan(draws)]
    if draws.size == 0:
        raise ValueError("the statistic is nan on every bootstrap resample")
    lo, hi = np.quantile(draws, [_tail(n, level), 1 - _tail(n, level)])
    return dict(est=float(est), lo=float(lo), hi=float(hi))


def _resamples(n, n_boot, seed, level):
    """[n_boot, n] int64 indices drawn with replacement from range(n); the arguments checked."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"need an integer n >= 2 units to resample, got {n!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap(stat, n, n_boot=N_BOOT, seed=0, level=0.95):
    """Percentile bootstrap (expanded for small n, see the module doc) over n paired units (seeds,
    or x0 rows). stat(idx) takes an int64 ndarray of n indices drawn with replacement (it indexes
    numpy arrays and torch tensors alike) and returns a float or a dict of floats; a resample where
    it returns nan is dropped (per key). Returns the point estimate stat(arange(n)) and the (lo, hi)
    interval: float stat -> dict(est=, lo=, hi=); dict stat -> {key: dict(est=, lo=, hi=)}.
    The same (n, n_boot, seed) gives the same resamples in every function of this module."""
    idx = _resamples(n, n_boot, seed, level)
    est = stat(np.arange(n))
    draws = [stat(i) for i in idx]
    if not isinstance(est, dict):
        return _interval(est, draws, n, level)
    return {k: _interval(v, [d[k] for d in draws], n, level) for k, v in est.items()}


def _patterns(n, n_perm, seed):
    """([P, n] int sign patterns in {-1, +1}, exact): all 2^n patterns, pattern 0 the identity,
    when 2^n <= n_perm; else n_perm random ones drawn with `seed`."""
    if isinstance(n_perm, bool) or not isinstance(n_perm, (int, np.integer)) or n_perm < 1:
        raise ValueError(f"n_perm must be a positive integer, got {n_perm!r}")
    if 2 ** n <= n_perm:
        return 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1), True
    return 1 - 2 * np.random.default_rng(seed).integers(0, 2, size=(n_perm, n)), False


def _p_value(hits, n_patterns, exact):
    """hits / 2^n when exact; (1 + hits) / (1 + n_perm) for Monte Carlo, so p is never 0."""
    return hits / n_patterns if exact else (1 + hits) / (1 + n_patterns)


def permutation_p(a, b, n_perm=N_PERM, seed=0):
    """Two-sided paired permutation (sign-flip) test of mean(a - b) = 0: with d = a - b,
    p = P(|sum(s * d)| >= |sum(d)|) over sign patterns s in {-1, +1}^n. Exact over all 2^n patterns
    when 2^n <= n_perm, else Monte Carlo with n_perm random patterns, p = (1 + hits) / (1 + n_perm)
    so it is never 0. Ties count as hits (up to float rounding)."""
    a, b = _pair(a, b)
    d = a - b
    signs, exact = _patterns(len(d), n_perm, seed)
    hits = int((np.abs(signs @ d) >= abs(d.sum()) - 1e-9 * np.abs(d).sum()).sum())
    return _p_value(hits, len(signs), exact)


def paired_difference(a, b, n_boot=N_BOOT, seed=0, level=0.95):
    """mean(a - b) over paired seeds with its bootstrap CI (seeds resampled, a and b together) and
    the paired permutation p-value (permutation_p with its defaults and this seed): dict(diff=, lo=,
    hi=, p=). lo, hi equal bootstrap(lambda i: (a - b)[i].mean(), n, n_boot, seed, level)'s."""
    a, b = _pair(a, b)
    d = a - b
    ci = _interval(d.mean(), d[_resamples(len(d), n_boot, seed, level)].mean(axis=1), len(d), level)
    return dict(diff=ci["est"], lo=ci["lo"], hi=ci["hi"], p=permutation_p(a, b, seed=seed))


def _log_std_ratio(a, b):
    """log(std(a) / std(b)) over the last axis (ddof 1); -inf / inf where a std is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(a.std(axis=-1, ddof=1)) - np.log(b.std(axis=-1, ddof=1))


def _std_swap_p(a, b, n_perm, seed):
    """std_permutation_p for S pairs of arms at once: a, b [S, n] -> p [S]."""
    swap, exact = _patterns(a.shape[1], n_perm, seed)
    swap = swap < 0  # [P, n]: True where seed s's a and b trade labels
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    obs = np.abs(_log_std_ratio(a, b))[:, None]
    stat = np.abs(_log_std_ratio(np.where(swap, b[:, None], a[:, None]),
                                 np.where(swap, a[:, None], b[:, None])))
    return _p_value((stat >= obs - 1e-9).sum(axis=1), len(swap), exact)


def std_permutation_p(a, b, n_perm=N_PERM, seed=0):
    """Two-sided paired test of std(a) = std(b): each arm is centred on its mean, then within any
    subset of seeds a's and b's centred values trade labels; p = P(|log(std a' / std b')| >=
    |log(std a / std b)|) over the 2^n subsets (exact when 2^n <= n_perm, else n_perm random ones,
    p = (1 + hits) / (1 + n_perm)); ties count as hits. Pairs are kept, so a seed effect shared by
    both arms stays in both. Under exchangeable pairs the test is exact; the centring (so that a
    difference of means is not read as one of spread) makes it approximate, as every permutation
    test of spread is when the means differ. Its smallest p is 2^(1 - n), like permutation_p's."""
    a, b = _pair(a, b)
    return float(_std_swap_p(a[None], b[None], n_perm, seed)[0])


def _std_tests(a, b, n_boot, seed, level, n_perm):
    """std_ratio's numbers for S pairs of arms at once: a, b [S, n] -> ratio, lo, hi, p, each [S].
    Every pair uses the same resamples and patterns (those of the given seed)."""
    n = a.shape[1]
    idx = _resamples(n, n_boot, seed, level)
    sa, sb = a[:, idx].std(axis=2, ddof=1), b[:, idx].std(axis=2, ddof=1)
    ratios = np.divide(sa, sb, out=np.full(sa.shape, np.nan), where=sb > 0)
    with np.errstate(invalid="ignore"):  # an all-nan row gives nan, checked by the caller
        lo, hi = np.nanquantile(ratios, [_tail(n, level), 1 - _tail(n, level)], axis=1)
    ratio = a.std(axis=1, ddof=1) / b.std(axis=1, ddof=1)
    return ratio, lo, hi, _std_swap_p(a, b, n_perm, seed)


def std_ratio(a, b, n_boot=N_BOOT, seed=0, level=0.95, n_perm=N_PERM):
    """std(a) / std(b) (ddof 1) with a paired bootstrap CI and std_permutation_p's p-value:
    dict(ratio=, lo=, hi=, p=). Resamples with std(b) = 0 (all n draws tied in b) are dropped,
    which for distinct values has probability about n^(1-n) per resample; std(b) = 0 on the data
    itself is a ValueError (the ratio is undefined)."""
    a, b = _pair(a, b)
    if b.std() == 0:
        raise ValueError("std(b) is 0: the ratio std(a) / std(b) is undefined")
    ratio, lo, hi, p = (float(v[0]) for v in _std_tests(a[None], b[None], n_boot, seed, level,
                                                        n_perm))
    if math.isnan(lo):
        raise ValueError("the statistic is nan on every bootstrap resample")
    return dict(ratio=ratio, lo=lo, hi=hi, p=p)


def holm(pvalues):
    """Holm's step-down adjustment of a family of m p-values: with p_(1) <= ... <= p_(m) sorted,
    the adjusted p_(j) = max over i <= j of min(1, (m - i + 1) p_(i)), returned in the input order
    as a list. Calling a test where its adjusted p < alpha keeps the chance of any false call in
    the family <= alpha, whatever the dependence between the tests. [] gives []."""
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1 or not ((p >= 0) & (p <= 1)).all():
        raise ValueError(f"p-values must be a 1-D sequence of numbers in [0, 1], got {pvalues!r}")
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(len(p))
    scaled = (len(p) - np.arange(len(p))) * p[order]  # (m - i + 1) p_(i)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted.tolist()


def untestable(n, alpha=0.05, tests=1):
    """True when no outcome of n paired seeds can pass: tests * 2^(1 - n) >= alpha (module doc)."""
    return tests * 2.0 ** (1 - n) >= alpha


def verdict(lo, hi, p, n, claim="higher", alpha=0.05, tests=1):
    """The verdict on a claimed effect from its CI [lo, hi] (of a difference, null 0; for a ratio
    pass lo - 1, hi - 1), its test's p-value p (Holm-adjusted over a family of `tests` tests, or
    raw with tests=1) and the n paired seeds:
      'untestable at n = k'  when untestable(n, alpha, tests): no p could go below alpha;
      'holds'                when the CI is entirely on the claimed side of 0 (claim 'higher':
                             lo > 0; 'lower': hi < 0) and p < alpha;
      'contradicted'         when the CI is entirely on the other side and p < alpha;
      'not detectable'       otherwise (the CI covers 0, or it does not and p >= alpha)."""
    if claim not in ("higher", "lower"):
        raise ValueError(f"claim must be 'higher' or 'lower', got {claim!r}")
    if not lo <= hi:
        raise ValueError(f"need lo <= hi, got lo = {lo}, hi = {hi}")
    if not 0 <= p <= 1:
        raise ValueError(f"p must be in [0, 1], got {p!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"need an integer n >= 2 paired seeds, got {n!r}")
    if not 0 < alpha < 1 or isinstance(tests, bool) or not isinstance(tests, int) or tests < 1:
        raise ValueError(f"need 0 < alpha < 1 and an integer tests >= 1, got {alpha!r}, {tests!r}")
    if untestable(n, alpha, tests):
        return f"untestable at n = {n}"
    if lo <= 0 <= hi or p >= alpha:
        return "not detectable"
    return "holds" if (lo > 0) == (claim == "higher") else "contradicted"


def at_bound(a, b, low=0.0, high=1.0):
    """'at ceiling' or 'at floor' when the bounds of a score in [low, high] (accuracy: [0, 1]),
    not the arms, can decide the ratio std(a) / std(b) of paired scores; None when it is a fair
    test. For each arm x against the other arm y, with x's headroom h = the distance from mean(x)
    to its nearer bound, the ratio is at that bound when
      - std(x) = 0 (no spread to compare), or
      - at least half of x's scores equal that bound (x's spread is cut off there), or
      - h < std(y): y's spread around x's mean would put more than 16 % of a normal's scores
        beyond the bound, so the bound alone can shrink x's spread below y's.
    From scratch, P-POTS+MIRROR-paper (0.944 ± 0.015) against Standard (0.637 ± 0.162): h = 0.056
    < 0.162, at ceiling."""
    a, b = _pair(a, b)
    for x, y in ((a, b), (b, a)):
        near = high if high - x.mean() <= x.mean() - low else low
        cut = (x == near).sum() >= len(x) / 2
        if x.std() == 0 or cut or abs(near - x.mean()) < y.std(ddof=1):
            return "at ceiling" if near == high else "at floor"
    return None


def _lower_rule(alpha):
    """The std rule's call 'lower' (verdict(lo - 1, hi - 1, p, n, 'lower', alpha) == 'holds') for
    S pairs of arms at once: (a [S, n], b [S, n]) -> bool [S], std_ratio's defaults."""
    def rule(a, b):
        if untestable(a.shape[1], alpha):
            return np.zeros(len(a), dtype=bool)
        _, lo, hi, p = _std_tests(a, b, N_BOOT, 0, 0.95, N_PERM)
        return (hi < 1) & (p < alpha) & (lo <= hi)
    return rule


@functools.lru_cache(maxsize=None)
def std_power(n, ratio, alpha=0.05, sims=1000, seed=0, rule=None):
    """The power of a std test at n paired seeds: the fraction of `sims` simulated studies, with
    a ~ N(0, ratio^2) and b ~ N(0, 1) on n seeds, independent (correlation 0), in which rule(a, b)
    calls the std of a lower; dict(power=, se=, sims=), se = the binomial Monte Carlo SE
    sqrt(power (1 - power) / sims). rule: (a [S, n], b [S, n]) -> bool [S]; None, the studies'
    rule: std_ratio's CI entirely below 1 and std_permutation_p's p < alpha, each study's call
    the one verdict() gives (before any Holm adjustment, so a family's power is lower). Cached."""
    if isinstance(sims, bool) or not isinstance(sims, int) or sims < 1 or not ratio > 0:
        raise ValueError(f"need an integer sims >= 1 and ratio > 0, got {sims!r}, {ratio!r}")
    rule = rule or _lower_rule(alpha)
    rng = np.random.default_rng(seed)
    a, b = ratio * rng.normal(size=(sims, n)), rng.normal(size=(sims, n))
    chunk = max(1, 2_000_000 // (n * max(N_BOOT, min(2 ** n, N_PERM))))  # [chunk, N_BOOT, n]
    calls = np.concatenate([rule(a[i:i + chunk], b[i:i + chunk]) for i in range(0, sims, chunk)])
    power = float(calls.mean())
    return dict(power=power, se=math.sqrt(power * (1 - power) / sims), sims=sims)


def fmt_diff(d, digits=3):
    """paired_difference's dict as '+0.061 [−0.012, +0.134], p = 0.41' (signed, Unicode minus)."""
    num = lambda x: f"{x:+.{digits}f}".replace("-", "\u2212")
    return f"{num(d['diff'])} [{num(d['lo'])}, {num(d['hi'])}], p = {d['p']:.2g}"


def fmt_ci(ci, scale=1.0):
    """A bootstrap interval dict(est, lo, hi) as 'est [lo, hi]', 3 significant digits, / scale."""
    return f"{ci['est'] / scale:.3g} [{ci['lo'] / scale:.3g}, {ci['hi'] / scale:.3g}]"


def spearman(x, y):
    """Spearman's rank correlation of two equal-length sequences (no ties expected)."""
    rank = lambda v: np.argsort(np.argsort(v))
    return float(np.corrcoef(rank(x), rank(y))[0, 1])


def fmt_ratio(r, digits=2):
    """std_ratio's dict as '0.09 [0.04, 0.20], p = 0.002'."""
    return f"{r['ratio']:.{digits}f} [{r['lo']:.{digits}f}, {r['hi']:.{digits}f}], p = {r['p']:.2g}"
