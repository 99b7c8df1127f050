"""A study's comparisons and its table.md: every comparison with its interval and its test, the
verdicts under one rule, Holm within declared families, and the power of the std test.

    arm           an arm's metric (accuracy, or a val ELBO) over its seeds at one point, with
                  its eval SE
    compare       one arm against another at one evaluated iteration, paired by seed
    judge         Holm within each family, then every verdict and the primary pairs' claims
    power         the std test's simulated power at the study's n (stats.std_power)
    write_table   table.md from study.summarise's summary

The rule (stats.verdict): a difference is higher or lower only when its 95 % CI excludes 0 (a
ratio's: 1) and its Holm-adjusted p is below ALPHA; 'untestable at n = k' when no outcome of k
seeds could pass; a std ratio that the bounds of accuracy decide (stats.at_bound) is 'at ceiling'
or 'at floor', with no test. The families, each held at ALPHA (so across the three the chance of
any false call is at most 3 ALPHA):
  primary          the study's declared (ours, ref) pairs x its points x both claims (mean up, std
                   down; a std claim at a bound is not tested, so not in the family);
  exploratory Δ    the difference of means of every other comparison at every point;
  exploratory std  the std ratio of every other comparison at every point, bounds left out.
"""
import math

import numpy as np

from lab.stats import (at_bound, fmt_diff, fmt_ratio, holm, paired_difference, std_power,
                       std_ratio, verdict)

ALPHA = 0.05
RATIOS = (0.5, 0.7)  # true std ratios whose power is printed under the comparisons
NOTES = ("Loss A, B, C: at the last step, means over seeds (ARM: A = B = 0). Clipped steps: the "
         "fraction of steps whose gradient norm exceeded grad_clip before clipping, mean over "
         "seeds. Eval SE: for accuracy sqrt(acc (1 − acc) / problems) at the arm's mean, for a val "
         "ELBO the root mean square of each run's own masking error (sample.val_elbo): the spread "
         "that scoring alone gives a run's value; a seed std near it is mostly evaluation noise. "
         "Forward rows: of training; + curve: P-POTS's measurement (forward only, no backward), "
         "in brackets as a share of the training rows: that is how "
         "much a 'same compute' comparison leaves out. Time: wall clock per run, start-up, "
         "evaluation, variance and P-POTS's curve included. Δ: difference of means, 95 % "
         "bootstrap CI over seeds, paired sign-flip permutation p; std ratio: std(method) / "
         "std(vs), ddof 1, 95 % bootstrap CI, paired label-swap permutation p on centred arms "
         "(lab/stats.py). Holm p: adjusted within its family (lab/table.py: primary, exploratory "
         "Δ, exploratory std; each at 5 %). A verdict needs both the CI (excluding 0, or 1) and "
         "Holm p < 0.05; 'untestable at n = k': no outcome of k seeds can pass; 'at ceiling' / "
         "'at floor': the ratio is left to the bounds of accuracy (stats.at_bound), not tested.")


def compare(a, b, it, bounded=True):
    """Arm a against arm b (study.summarise's per-arm dicts) at evaluated iteration `it`, paired
    over the seeds where both have a value there: dict(iter, seeds, diff, std_ratio, std_bound).
    diff: stats.paired_difference of a - b, std_ratio: stats.std_ratio (dicts with p), None under
    2 paired seeds; std_bound (a metric `bounded` in [0, 1] only): stats.at_bound's label, in which
    case std_ratio is None (no test)."""
    x = dict(zip(a["seeds"], a["points"][str(it)]["values"]))
    y = dict(zip(b["seeds"], b["points"][str(it)]["values"]))
    seeds = [s for s in x if x[s] is not None and y.get(s) is not None]
    xs, ys = [x[s] for s in seeds], [y[s] for s in seeds]
    if len(seeds) < 2:
        return dict(iter=it, seeds=seeds, diff=None, std_ratio=None, std_bound=None)
    bound = at_bound(xs, ys) if bounded else None
    return dict(iter=it, seeds=seeds, diff=paired_difference(xs, ys), std_bound=bound,
                std_ratio=None if bound else std_ratio(xs, ys))


def judge(comparisons, methods, primary, lower_is_better=False, alpha=ALPHA):
    """Holm within each family (module doc), then every verdict, in place. Each test's dict gains
    p_holm and holm_m (its family's size); each comparison gains family ('primary' for a pair in
    `primary`, else 'exploratory'), diff_verdict (higher / lower / not detectable / untestable at
    n = k: the metric's difference as it is), std_verdict (the same, or at ceiling / at floor),
    and, in the primary family, claims: better (the mean moves the good way: up for accuracy,
    down when lower_is_better) and std_down (holds / contradicted / not detectable / untestable
    ... / at ...), and best_ref, worst_ours, worst_beats_best at that iteration (from `methods`,
    every seed that has a value: a plain min/max; "the best baseline run is worse than our worst
    run")."""
    families = {}
    for c in comparisons:
        c["family"] = "primary" if (c["method"], c["ref"]) in primary else "exploratory"
        for key, name in (("diff", "Δ"), ("std_ratio", "std")):
            if c[key]:
                families.setdefault(c["family"] + (name if c["family"] != "primary" else ""),
                                    []).append(c[key])
    for tests in families.values():
        for test, p in zip(tests, holm([t["p"] for t in tests])):
            test.update(p_holm=p, holm_m=len(tests))
    for c in comparisons:
        d, r, n = c["diff"], c["std_ratio"], len(c["seeds"])
        up = d and verdict(d["lo"], d["hi"], d["p_holm"], n, "higher", alpha, d["holm_m"])
        better = d and verdict(d["lo"], d["hi"], d["p_holm"], n,
                               "lower" if lower_is_better else "higher", alpha, d["holm_m"])
        down = c["std_bound"] or r and verdict(r["lo"] - 1, r["hi"] - 1, r["p_holm"], n, "lower",
                                               alpha, r["holm_m"])
        c["diff_verdict"] = {"holds": "higher", "contradicted": "lower"}.get(up, up)
        c["std_verdict"] = {"holds": "lower", "contradicted": "higher"}.get(down, down)
        if c["family"] == "primary":
            values = lambda m: [v for v in methods[m]["points"][str(c["iter"])]["values"]
                                if v is not None]
            ref, ours = values(c["ref"]), values(c["method"])
            best, worst = ((min(ref, default=None), max(ours, default=None)) if lower_is_better
                           else (max(ref, default=None), min(ours, default=None)))
            c["claims"] = dict(better=better, std_down=down, best_ref=best, worst_ours=worst,
                               worst_beats_best=None if None in (best, worst) else
                               (worst < best if lower_is_better else worst > best))
    return comparisons


def power(comparisons, alpha=ALPHA):
    """The std rule's power at the largest n of paired seeds among the comparisons, for each true
    ratio in RATIOS (stats.std_power, before Holm): dict(n, alpha, ratios: {ratio: dict(power,
    se, sims)}), or None under 2 paired seeds."""
    n = max((len(c["seeds"]) for c in comparisons), default=0)  # the study's seeds, as a rule
    if n < 2:
        return None
    return dict(n=n, alpha=alpha, ratios={str(r): std_power(n, r, alpha) for r in RATIOS})


def _num(x, f=".3f"):
    return "—" if x is None else format(x, f)


def _row(*cells):
    return "| " + " | ".join(map(str, cells)) + " |"


def _per_seed(values, f):
    return " ".join("—" if v is None else format(v, f) for v in values)


def _rows(s):
    """'8,000 + 8,832 curve (+110 %)': training forward rows and P-POTS's curve, as a share."""
    if not s["curve_rows"]:
        return f"{s['forward_rows']:,}"
    share = 100 * s["curve_rows"] / s["forward_rows"]
    return f"{s['forward_rows']:,} + {s['curve_rows']:,} curve (+{share:,.0f} %)"


def _methods_table(methods, metric):
    f = metric["fmt"]
    lines = [_row("method", "runs", f"{metric['label']} mean ± std", "eval SE", "min", "max",
                  "per seed", "val ELBO (bits/tok)", "loss A", "loss B", "loss C", "clipped steps",
                  "forward rows / run", "time (s)"), _row(*["---"] * 14)]
    for m, s in methods.items():
        n_failed = len(s["failed"])
        runs = f"{len(s['values']) - n_failed}" + f" + {n_failed} FAILED" * bool(n_failed)
        per_seed = " ".join("FAILED" if v is None else format(v, f) for v in s["values"])
        lines.append(_row(m, runs, f"{_num(s['mean'], f)} ± {_num(s['std'], f)}",
                          _num(s["eval_se"], f), _num(s["min"], f), _num(s["max"], f), per_seed,
                          _num(s["val_bits"], ".4f"),
                          *(_num(s[k], ".3g") for k in ("loss_A", "loss_B", "loss_C")),
                          _num(s["clip_frac"], ".2f"), _rows(s), _num(s["seconds"], ".0f")))
    return lines


def _point_table(methods, it, metric):
    """The metric of every arm at an evaluated iteration before the last."""
    f = metric["fmt"]
    lines = ["", f"## {metric['label'][0].upper() + metric['label'][1:]} at iteration {it}", "",
             _row("method", "mean ± std", "eval SE", "per seed (—: failed / not evaluated)"),
             _row(*["---"] * 4)]
    for m, s in methods.items():
        p = s["points"][str(it)]
        lines.append(_row(m, f"{_num(p['mean'], f)} ± {_num(p['std'], f)}",
                          _num(p["eval_se"], f), _per_seed(p["values"], f)))
    return lines


def _test(t, fmt):
    """(the interval and raw p, the Holm p with its family size) of a test dict."""
    return fmt(t), f"{t['p_holm']:.2g} (of {t['holm_m']})"


def _comparison_table(comparisons, it, final, metric):
    digits = int(metric["fmt"][1:-1])
    lines = ["", f"## Comparisons at iteration {it}" + " (the end)" * final + ", paired by seed "
             "over the seeds where both runs succeeded", "",
             _row("method", "vs", "family", "paired seeds", f"Δ mean {metric['label']} [95 % CI], "
                  "p", "Holm p", "Δ", "std ratio [95 % CI], p", "Holm p", "std"),
             _row(*["---"] * 10)]
    for c in (c for c in comparisons if c["iter"] == it):
        diff = _test(c["diff"], lambda d: fmt_diff(d, digits)) if c["diff"] else \
            ("— (< 2 paired seeds)", "—")
        ratio = _test(c["std_ratio"], fmt_ratio) if c["std_ratio"] else ("—", "—")
        lines.append(_row(c["method"], c["ref"], c["family"], len(c["seeds"]), *diff,
                          c["diff_verdict"] or "—", *ratio, c["std_verdict"] or "—"))
    return lines


def _power_lines(pw):
    if pw is None:
        return []
    (r1, p1), (r2, p2) = pw["ratios"].items()
    pct = lambda p: f"{100 * p['power']:.0f} % ± {100 * p['se']:.0f} %"
    return ["", f"Power of the std test at n = {pw['n']} seeds, before Holm (normal data, arms "
                f"independent, the CI and p < {pw['alpha']:g} as above; {p1['sims']} simulations, "
                f"± 1 Monte Carlo SE): a true ratio of {r1} is called lower in {pct(p1)} of "
                f"studies, a ratio of {r2} in {pct(p2)}. 'Not detectable' is weak evidence of no "
                f"effect."]


def _claims_table(comparisons, metric):
    way, f = "down" if metric["lower_is_better"] else "up", metric["fmt"]
    lines = ["", "## The paper's claims, for the primary pairs", "",
             _row("ours", "vs", "iteration", f"mean {metric['label']} {way}", "seed std down",
                  "\"the best baseline run is worse than our worst run\" (min/max, no interval)"),
             _row(*["---"] * 6)]
    for c in comparisons:
        k = c["claims"]
        beats = {True: "holds", False: "does not hold", None: "—"}[k["worst_beats_best"]]
        lines.append(_row(c["method"], c["ref"], c["iter"],
                          k["better"] or "— (< 2 paired seeds)",
                          k["std_down"] or "— (< 2 paired seeds)",
                          f"{beats}: best {c['ref']} {_num(k['best_ref'], f)}, worst "
                          f"{c['method']} {_num(k['worst_ours'], f)}"))
    return lines


def write_table(study, summary, path):
    """Markdown: each method's runs (and its metric at every earlier point); the comparisons at
    each point with the std power; the primary pairs' claims; the failed runs; the notes."""
    cfg, methods, comparisons = summary["config"], summary["methods"], summary["comparisons"]
    metric = summary["metric"]
    flags = " ".join(f for f in (cfg["task_args"], cfg["train_args"]) if f)
    lines = ["# " + study.title.format(max_iters=cfg["max_iters"], flags=flags), ""]
    lines += _methods_table(methods, metric)
    iters = summary["iters"]
    for it in iters[:-1]:
        lines += _point_table(methods, it, metric)
    for it in iters if comparisons else ():
        lines += _comparison_table(comparisons, it, it == iters[-1], metric)
    n = min((len(c["seeds"]) for c in comparisons if len(c["seeds"]) >= 2), default=99)
    if n <= 5:
        lines += ["", f"With {n} paired seeds no p-value can go below {2 ** (1 - n):.2g}: such "
                      f"verdicts are 'untestable at n = {n}', a smoke test."]
    lines += _power_lines(summary["std_power"])
    claims = [c for c in comparisons if "claims" in c]
    if claims:
        lines += _claims_table(claims, metric)
    failed = [f"- {m} seed {f['seed']}: {f['reason']}"
              for m, s in methods.items() for f in s["failed"]]
    runs = sum(len(s["values"]) for s in methods.values())
    lines += ["", f"{runs} runs, {len(failed)} FAILED (not results; retried on the next call)."]
    lines += failed
    lines += ["", " ".join(filter(None, (study.notes, "Paired by seed: " + study.pairing
                                         if study.pairing else "", NOTES)))]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def arm(values, extra, bounded=True):
    """An arm's metric at one point over its seeds: dict(values, mean, std (ddof 1), min, max,
    eval_se), from the per-seed values and, per seed, `extra` (None: failed, not evaluated, or not
    recorded): for a `bounded` metric (accuracy) the number of problems scored, and eval_se =
    sqrt(m (1 - m) / problems) at the mean m, None unless every run with a value recorded the same
    number; otherwise each run's own standard error, and eval_se their root mean square (the
    typical run's), None unless every run recorded one."""
    ok = [v for v in values if v is not None]
    extras = [e for v, e in zip(values, extra) if v is not None]
    mean = float(np.mean(ok)) if ok else None
    if not ok or None in extras:
        se = None
    elif bounded:
        se = math.sqrt(mean * (1 - mean) / extras[0]) if len(set(extras)) == 1 else None
    else:
        se = math.sqrt(float(np.mean(np.square(extras))))
    return dict(values=values, mean=mean, std=float(np.std(ok, ddof=1)) if len(ok) > 1 else None,
                min=min(ok, default=None), max=max(ok, default=None), eval_se=se)
