"""The standalone variance table: for every t-sampler x masking on one checkpoint, the loss's and
the gradient's A, B, C (variance.measure) with 95 % intervals from a bootstrap over x0, the
paired A ratios of MIRROR and pair to standard, of MIRROR to pair and of P-POTS to uniform t, and
P-POTS's total against its floor.

    python -m lab.variance_table --out_dir=out [--n_x0=64 --n_t=16 --n_masks=4 --grad_n_x0=16
                                               --n_proj=4 --n_boot=4000 --device=cpu --seed=0]
"""
import functools
import math
import os
import sys
import time

import torch
from tqdm import tqdm

import samplers
from checkpoint import load_checkpoint
from configurator import check_ranges, configure, report_errors
from data import task_from_checkpoint
from lab import plots, stats
from lab.stats import fmt_ci
from masking import MODES, MaskSpec, clean_rows
from variance import _batch_var, components, measure, x0_summary


def bootstrap_x0(stat, draws, n_boot=4000, seed=0, level=0.95):
    """stats.bootstrap's percentile intervals over x0, the unit of independence (each resampled
    row keeps all its draws): dict(est, lo, hi), or {key: dict(est, lo, hi)}. draws: {name:
    L[a, ...]} on the SAME a x0s (e.g. measure(keep_draws=True) with one generator seed), all
    resampled with the SAME rows, so ratios are paired. stat(comps, idx) -> float or dict, with
    comps = {name: components on the rows idx}; idx lets it resample other per-x0 arrays alike."""
    summaries = {name: x0_summary(L) for name, L in draws.items()}
    sizes = {len(s["mean"]) for s in summaries.values()}
    if len(sizes) != 1:
        raise ValueError(f"bootstrap_x0 needs all arrays on the same x0s, got {sorted(sizes)} rows")
    return stats.bootstrap(
        lambda idx: stat({name: components(s, idx) for name, s in summaries.items()}, idx),
        sizes.pop(), n_boot, seed, level)



def versus_baseline(draws, rows, baseline="Standard", n_boot=2000, seed=0):
    """Arms measured on the same x0s (draws: {arm: measure(keep_draws=True)['draws']}), each with
    its clean rows per step (rows: {arm: int}): {(arm, key): dict(est, lo, hi)} for key A, B, C,
    total (per draw), batch = total / rows (the variance of a batch's mean, for i.i.d. rows) and,
    when the baseline is among the arms, ratio = batch / the baseline's batch, paired over x0."""
    def stat(comps, idx):
        out = {}
        for arm, c in comps.items():
            out.update({(arm, k): c[k] for k in ("A", "B", "C", "total")})
            out[arm, "batch"] = c["total"] / rows[arm]
        if baseline in comps:
            for arm in comps:
                out[arm, "ratio"] = out[arm, "batch"] / out[baseline, "batch"]
        return out
    return bootstrap_x0(stat, draws, n_boot, seed)


def ppots_floor(t_grid, m, g):
    """The smallest variance of the training draw under any unbiased t-law, (int √m)^2 - (int g)^2
    over [0, 1] (docs/variance.md, "Why p ∝ √m"): m extended as samplers.extended_sqrt_m, g
    (finite as t -> 0) held flat beyond both ends of the grid."""
    t, g = torch.as_tensor(t_grid, dtype=torch.float64), torch.as_tensor(g, dtype=torch.float64)
    _, root = samplers.curve_integrals(t, torch.as_tensor(m, dtype=torch.float64).sqrt())
    mean = torch.trapezoid(g, t) + t[0] * g[0] + (1 - t[-1]) * g[-1]
    return root ** 2 - mean.item() ** 2


def _print_aligned(lines):
    """Rows of strings as right-aligned columns, two spaces apart."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))


def _print_table(target, cis, rows, res, n):
    """One target's A, B, C, total as 'est [lo, hi]' in a common unit (a power of 1000)."""
    keys = ("A", "B", "C", "total")
    top = max(abs(v) for r in rows for k in keys for v in cis[(*r, k)].values()) or 1.0
    scale = 10.0 ** (3 * math.floor(math.log10(top) / 3))
    loss = target == "loss"
    print(f"\n{target}: variance components in units of {scale:.0e}, est [95 % interval], "
          f"bootstrap over the {n} x0s" + (", and batch_var" if loss else ""))
    _print_aligned([["sampler", "masking", *keys] + ["batch_var"] * loss] + [
        [*r, *(fmt_ci(cis[(*r, k)], scale) for k in keys)]
        + [f"{res['loss', r]['batch_var']:.3g}"] * loss for r in rows])


def main(argv):
    """Per target: A, B, C, total with x0 intervals per t-sampler x masking, the paired A ratios of
    MIRROR and pair to standard, of MIRROR to pair and of P-POTS to uniform, P-POTS's total against
    its floor; components_vs_t.png."""
    cfg = configure(dict(out_dir="out", n_x0=64, n_t=16, n_masks=4, n_batches=64, grad_n_x0=16,
                         n_proj=4, n_boot=4000, device="cpu", seed=0), argv)
    check_ranges(cfg, {"n_x0": (2, None), "n_t": (2, None), "n_masks": (2, None),
                       "n_batches": (2, None), "grad_n_x0": (2, None), "n_proj": (1, None),
                       "n_boot": (100, None)})
    start = time.time()
    model, ckpt = load_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"), cfg["device"])
    dataset = task_from_checkpoint(ckpt)
    n_x0 = {"loss": cfg["n_x0"], "grad": cfg["grad_n_x0"]}
    kw = dict(n_t=cfg["n_t"], n_masks=cfg["n_masks"], n_batches=cfg["n_batches"],
              n_proj=cfg["n_proj"], keep_draws=True)
    batch_rows = lambda mode: clean_rows(ckpt["config"]["batch_size"], mode,  # train.py's rows
                                         ckpt["config"]["matched_compute"])
    gen = lambda shift=0: torch.Generator().manual_seed(cfg["seed"] + shift)  # gen(): same x0s
    causal = ckpt["model_args"].get("causal")
    names = ("uniform", "stratified", "ppots")
    rows = [("ARM", "-")] if causal else [(s, mode) for mode in MODES for s in names]
    res, curves, fitted = {}, {}, {}
    for s, mode in tqdm(rows, desc="variance"):
        spec = MaskSpec("standard" if causal else mode)
        if s == "stratified":  # one row's law is uniform's (Sampler.marginal), so with the same
            # generator its per-draw A, B, C are uniform's, draw for draw: only the batch changes
            res["grad", (s, mode)] = res["grad", ("uniform", mode)]
            res["loss", (s, mode)] = {**res["loss", ("uniform", mode)], "batch_var": _batch_var(
                model, dataset, samplers.make_sampler(s), spec, batch_rows(mode), cfg["n_batches"],
                gen(), 1024)}
            continue
        if s == "ppots":  # fitted on other x0s (gen(1)); the floor's curve on the table's x0s
            fit_curve = samplers.measure_curve(model, dataset, spec, generator=gen(1))
            fitted[mode] = samplers.PPOTS(fit_curve["t"], fit_curve["m"].sqrt())
            curves[mode] = samplers.measure_curve(model, dataset, spec, n_x0=cfg["n_x0"],
                                                  n_masks=cfg["n_masks"], generator=gen(),
                                                  keep_draws=True)
            sampler = fitted[mode]
        else:
            sampler = None if causal else samplers.make_sampler(s)
        for target in ("loss", "grad"):
            res[target, (s, mode)] = measure(model, dataset, sampler, spec, n_x0[target],
                                             target=target, generator=gen(),
                                             batch_size=batch_rows(mode), **kw)
    per_x0 = {mode: ((cv["draws"] ** 2).mean(2).numpy(), cv["draws"].mean(2).numpy())
              for mode, cv in curves.items()}  # per-x0 m and g on the grid, [n_x0, T - 1]

    def stat(comps, idx, target):
        out = {(*r, k): v for r in rows for k, v in comps[r].items()}
        for s in names if not causal else ():
            for mode in ("mirror", "pair"):
                out["ratio", s, mode] = comps[s, mode]["A"] / comps[s, "standard"]["A"]
            out["ratio", s, "mirror/pair"] = comps[s, "mirror"]["A"] / comps[s, "pair"]["A"]
        for mode in MODES if not causal else ():
            out["ppots/uniform", mode] = comps["ppots", mode]["A"] / comps["uniform", mode]["A"]
        if target == "loss":
            for mode, (m_x0, g_x0) in per_x0.items():
                floor = ppots_floor(curves[mode]["t"], m_x0[idx].mean(0), g_x0[idx].mean(0))
                out["floor", mode] = floor
                out["above", mode] = comps["ppots", mode]["total"] / floor
        return out
    cis = {target: bootstrap_x0(functools.partial(stat, target=target),
                                {r: res[target, r]["draws"] for r in rows}, cfg["n_boot"],
                                cfg["seed"])
           for target in ("loss", "grad")}
    for target in ("loss", "grad"):
        _print_table(target, cis[target], rows, res, n_x0[target])
    if not causal:
        print("stratified: one row's t-law is uniform's, so its rows repeat uniform's draws; "
              "StraTS shows only in batch_var, the variance of a training batch's mean")
        print("\nA of MIRROR and of pair over A of standard, paired on the same x0s (theory: pair "
              "= 1/2; MIRROR <= 1/2 if a token's CE ignored the rest of the mask)")
        pairs = [(target, mode) for target in ("loss", "grad") for mode in ("mirror", "pair")]
        _print_aligned([["sampler", *(f"{t} {mode}/standard" for t, mode in pairs)]] + [
            [s, *(fmt_ci(cis[t]["ratio", s, mode]) for t, mode in pairs)] for s in names])
        print("\nA of MIRROR over A of pair, and A under P-POTS over A under uniform t, paired on "
              "the same x0s (an interval that covers 1: the two are not told apart)")
        _print_aligned([["sampler", "loss mirror/pair", "grad mirror/pair"]] + [
            [s, *(fmt_ci(cis[t]["ratio", s, "mirror/pair"]) for t in ("loss", "grad"))]
            for s in names])
        _print_aligned([["masking", "loss ppots/uniform", "grad ppots/uniform"]] + [
            [mode, *(fmt_ci(cis[t]["ppots/uniform", mode]) for t in ("loss", "grad"))]
            for mode in MODES])
        print("\nP-POTS, fitted on other x0s: predicted from its curve, then its measured total "
              "against the floor (int √m)^2 - (int g)^2 of any unbiased t-law on the table's x0s")
        for mode, sampler in fitted.items():
            loss, (ours, best) = cis["loss"], samplers.second_moments(sampler)
            print(f"{mode:>8}: predicted E[(w l)^2] x{ours:.3f} of uniform's, optimum x{best:.3f}\n"
                  f"{'':>10}measured total {fmt_ci(loss['ppots', mode, 'total'])}, floor "
                  f"{fmt_ci(loss['floor', mode])}, total / floor {fmt_ci(loss['above', mode])}")
        path = os.path.join(cfg["out_dir"], "components_vs_t.png")
        plots.plot_components(curves, path)
        print(f"wrote {path}")
    print(f"the variance table took {time.time() - start:.0f} s")


if __name__ == "__main__":
    report_errors()
    main(sys.argv[1:])
