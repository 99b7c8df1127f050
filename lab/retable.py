"""Re-table a finished study under today's rules from its per-seed accuracies alone: table.py's
comparisons, Holm families, verdicts, at-ceiling cells and std power, without the runs. (A study
whose runs are cached re-tables itself: its next call trains nothing and rewrites table.md.)

    python -m lab.retable --per_seed=docs/results_per_seed.json   # docs/results.md's study
    python -m lab.retable --per_seed=PATH --out=table.md          # written there, not printed

The JSON: {"note": where the numbers come from (optional), "study": "scratch"
(reproduce.SCRATCH) or "sft" (reproduce_sft.SFT), "args": [that study's flags, as its command
line had them], "problems": held-out problems per run, "correct": {method: [problems solved by
seed s's final evaluation, null for a failed run]}}. The flags plan
the runs as the study would (their forward rows); what accuracies alone cannot give (val ELBO,
loss A, B, C, clipped steps, time, any earlier point) is shown as "—".
"""
import json
import os
import sys
import tempfile

from configurator import configure, report_errors
from lab import reproduce, reproduce_sft, study, table

STUDIES = {"scratch": reproduce.SCRATCH, "sft": reproduce_sft.SFT}


def retable(per_seed):
    """(the Study, summary) of per_seed, the JSON's contents (module doc)."""
    if set(per_seed) - {"note"} != {"study", "args", "problems", "correct"}:
        raise ValueError("the JSON needs the keys study, args, problems, correct (and may have "
                         "a note)")
    if per_seed["study"] not in STUDIES:
        raise ValueError(f"study must be one of {', '.join(STUDIES)}, got {per_seed['study']!r}")
    s, counts, n = STUDIES[per_seed["study"]], per_seed["correct"], per_seed["problems"]
    seeds = {len(v) for v in counts.values()}
    if len(seeds) != 1 or not all(k is None or 0 <= k <= n for v in counts.values() for k in v):
        raise ValueError(f"correct: every method needs one count in [0, {n}] (or null) per seed")
    cfg = study.parse(s, [*per_seed["args"], f"--methods={','.join(counts)}",
                          f"--seeds={seeds.pop()}"])
    jobs = study.plan(s, cfg)
    for j in jobs:
        k = counts[j["method"]][j["seed"]]
        j["record"] = dict(status="failed", seed=j["seed"], reason="failed") if k is None else \
            dict(status="ok", seed=j["seed"], iter=cfg["max_iters"], acc=k / n, problems=n,
                 curve=[[cfg["max_iters"], k / n]], curve_problems=[n])
    return s, study.summarise(s, cfg, jobs)


def main(argv):
    cfg = configure(dict(per_seed="", out=""), argv)
    if not os.path.isfile(cfg["per_seed"]):
        raise ValueError(f"--per_seed={cfg['per_seed']!r} is not a file")
    s, summary = retable(json.load(open(cfg["per_seed"])))
    if cfg["out"]:
        table.write_table(s, summary, cfg["out"])
        print(f"wrote {cfg['out']}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        table.write_table(s, summary, os.path.join(tmp, "table.md"))
        print(open(os.path.join(tmp, "table.md")).read(), end="")


if __name__ == "__main__":
    report_errors()
    main(sys.argv[1:])
