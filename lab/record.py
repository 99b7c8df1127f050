"""A finished train.py run as a study reads it: the metric it is scored by, its record (from its
log.jsonl), its value at an evaluated iteration, its forward rows, and an arm's curve over seeds.

A run is scored by a Metric: held-out exact match (ACCURACY, the default) or the val ELBO
(VAL_ELBO, lower is better; task=text). Its record keeps the final score under the metric's key
(acc, val_nats) with its number of problems (accuracy) or its own standard error (se: the val
ELBO's masking error), the val ELBO in bits, the loss's and gradient's variance components and the
loss's batch_var at the last step, the fraction of clipped steps (clip_frac), the score at every
evaluation (curve) with its problems or SE (curve_problems, curve_se) and the last logged epoch
(epochs), when train.py logs them; a record cached before a field existed shows it as "—". A run
that logs a non-finite value of FINITE, or has no final evaluation with its metric, is not a
result (final_result raises).
"""
import json
import math
import os
from dataclasses import dataclass

import numpy as np

from masking import clean_rows

FINITE = ("loss", "grad_norm", "val_nats", "val_bits", "val_se_nats", "acc")  # a result needs them


@dataclass(frozen=True)
class Metric:
    """What a study scores each run by: log.jsonl's `key` at each evaluation."""
    key: str                # the logged value, e.g. 'acc'
    label: str              # the table's words for it
    fmt: str                # its format, e.g. '.3f'
    lower_is_better: bool   # the paper's "mean up" claim reads "down" then
    bounded: bool           # a rate in [0, 1] over `problems`: binomial eval SE, ceiling cells
    se_key: str = ""        # the logged per-run standard error of the value, if any

    @property
    def extra(self):
        """What a record keeps beside each value: 'se' (its own error) or 'problems' (scored)."""
        return "se" if self.se_key else "problems"


ACCURACY = Metric("acc", "held-out exact match", ".3f", lower_is_better=False, bounded=True)
VAL_ELBO = Metric("val_nats", "val ELBO (nats/token)", ".4f", lower_is_better=True, bounded=False,
                  se_key="val_se_nats")


def forward_rows(conf, curve_rows):
    """(training, P-POTS curve) forward rows of a run with train.py config `conf`: max_iters x
    clean_rows x views (2 for mirror/pair); one curve of curve_rows per P-POTS measurement (a refit
    measures again unless online)."""
    views = 2 if conf["masking"] in ("mirror", "pair") and conf["model_type"] == "mdm" else 1
    every = 0 if conf["ppots_online"] else conf["ppots_refit_every"]
    fits = len(range(conf["ppots_fit_iter"], conf["max_iters"], every or max(1, conf["max_iters"])))
    fits *= conf["t_sampler"] == "ppots"
    rows = clean_rows(conf["batch_size"], conf["masking"], conf["matched_compute"])
    return conf["max_iters"] * rows * views, fits * curve_rows * views


def final_result(out_dir, returncode, max_iters, metric=ACCURACY):
    """A finished run's metrics from its log.jsonl; ValueError(why) if the run is not a result."""
    if returncode:
        lines = open(os.path.join(out_dir, "stdout.txt")).read().strip().splitlines()
        last = lines[-1].removeprefix("error: ") if lines else "(no output)"
        raise ValueError(f"train.py exited with status {returncode}: {last}")
    try:
        log = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    except (OSError, ValueError) as e:
        raise ValueError(f"log.jsonl unreadable: {e}") from None
    for r in log:
        for key in FINITE:
            if key in r and not (isinstance(r[key], (int, float)) and math.isfinite(r[key])):
                raise ValueError(f"non-finite {key} ({r[key]}) at iteration {r.get('iter')}")
    key = metric.key
    evals = [r for r in log if "val_bits" in r and key in r]
    final = [r for r in evals if r["iter"] == max_iters]
    if not final:
        raise ValueError(f"log.jsonl has no final evaluation with {key} (iteration {max_iters})")
    var = [r["variance"] for r in log if "variance" in r and r["iter"] == max_iters]
    abc = {f"{t}_{k}": var[-1][t][k] if var else None for t in ("loss", "grad") for k in "ABC"}
    abc["loss_batch_var"] = var[-1]["loss"].get("batch_var") if var else None
    epochs = [r["epoch"] for r in log if "epoch" in r]
    get_extra = lambda r: r.get(metric.se_key or "problems")
    return {"iter": max_iters, key: final[-1][key], metric.extra: get_extra(final[-1]),
            "val_bits": final[-1]["val_bits"], **abc,
            "clip_frac": mean(r["clip_frac"] for r in log if "clip_frac" in r),
            "epochs": epochs[-1] if epochs else None,
            "curve": [[r["iter"], r[key]] for r in evals],
            f"curve_{metric.extra}": [get_extra(r) for r in evals]}


def at(rec, it, metric=ACCURACY):
    """(the metric's value, its extra: problems, or the run's SE when the metric logs one) of a run
    record at evaluated iteration `it`; (None, None) for a failed run or one not evaluated there;
    the extra None where the record predates it."""
    if rec["status"] != "ok":
        return None, None
    if it == rec["iter"]:
        return rec[metric.key], rec.get(metric.extra)
    curve, extras = rec.get("curve", []), rec.get(f"curve_{metric.extra}")
    found = [k for k, (i, _) in enumerate(curve) if i == it]
    if not found:
        return None, None
    return curve[found[-1]][1], extras[found[-1]] if extras else None


def mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def curves(jobs, arms, start=None):
    """{arm: dict(iters, rows, seeds, mean, std)} for the arms (in order) with a successful run:
    the score at every evaluation, mean and std (ddof 1; 0 for one seed) over the successful
    seeds, against the iteration and the training forward rows. start(conf) -> [(0, value)] puts a
    point before the runs' own (e.g. a pretrained model's score, the same for every seed) when the
    runs did not evaluate iteration 0 themselves."""
    out = {}
    for arm in arms:
        recs = [j["record"] for j in jobs if j["method"] == arm and j["record"]["status"] == "ok"]
        if not recs:
            continue
        conf = next(j["conf"] for j in jobs if j["method"] == arm)
        per_step = forward_rows(conf, 0)[0] / conf["max_iters"]
        first = [] if recs[0]["curve"][0][0] == 0 or start is None else start(conf)
        its = [it for it, _ in first + recs[0]["curve"]]
        values = np.array([[v for _, v in first + r["curve"]] for r in recs])
        out[arm] = dict(iters=its, rows=[it * per_step for it in its], seeds=len(recs),
                        mean=values.mean(0).tolist(),
                        std=values.std(0, ddof=1 if len(recs) > 1 else 0).tolist())
    return out
