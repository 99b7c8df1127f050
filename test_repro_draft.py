"""Draft tests of reproduce.py (to be folded into test_all.py): one tiny study (2 methods x 2 seeds
x 4 steps of a 1-layer model) trained once per module and reused; bad input and the statistics on
hand-made records need no training. Run: python -m pytest -q test_repro_draft.py"""
import json
import math
import os
import re
import shutil

import pytest

import reproduce

TINY = ("--n_layer=1 --n_head=2 --n_embd=32 --num_digits=4 --eval_problems=32 --eval_iters=1 "
        "--batch_size=16 --variance_n_x0=4 --variance_grad_n_x0=2")
METHODS = ["Standard", "P-POTS+MIRROR"]


def args(out, *extra, methods=METHODS):
    return [f"--out={out}", f"--methods={','.join(methods)}", "--seeds=2", "--max_iters=4",
            "--threads=1", f"--train_args={TINY}", *extra]


def records(out):
    return [json.loads(line) for line in open(os.path.join(out, "runs.jsonl"))]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    assert reproduce.main(args(out, "--jobs=2")) == 0
    return out


def cached_copy(study, out):
    """A fresh --out holding only the study's runs.jsonl: its runs are cached there."""
    os.makedirs(out)
    shutil.copy(study / "runs.jsonl", out / "runs.jsonl")


def test_tiny_study_writes_every_row_with_intervals_and_claims_and_a_second_call_trains_nothing(
        study, capsys):
    table = (study / "table.md").read_text()
    for m in METHODS:
        assert f"| {m} | 2 | " in table
    assert "| Δ mean acc [95 % CI], p | Δ | std ratio [95 % CI] | std |" in table
    assert re.search(r"\n\| P-POTS\+MIRROR \| Standard \| 2 \| [+−]\d\.\d{3} \[[+−]\d\.\d{3}, "
                     r"[+−]\d\.\d{3}\], p = [\d.]+ \| (higher|lower|not detectable) \|", table)
    assert ("| ours | vs | mean accuracy up | seed std down | \"the best baseline run stays below our "
            "worst run\" (min/max, no interval) |") in table
    assert re.search(r"\n\| P-POTS\+MIRROR \| Standard \| (holds|not detectable|contradicted) \| "
                     r".+ \| (holds|does not hold): best Standard \d\.\d{3}, worst P-POTS\+MIRROR "
                     r"\d\.\d{3} \|\n", table)
    assert "no p-value can go below 0.5" in table and "0 FAILED" in table
    summary = json.load(open(study / "summary.json"))
    rows = {m: (s["forward_rows"], s["curve_rows"]) for m, s in summary["methods"].items()}
    assert rows == {"Standard": (4 * 16, 0), "P-POTS+MIRROR": (4 * 8 * 2, 69 * 32 * 4 * 2)}
    (c,) = summary["comparisons"]
    assert (c["method"], c["ref"], c["seeds"]) == ("P-POTS+MIRROR", "Standard", [0, 1])
    assert c["diff"]["lo"] <= c["diff"]["diff"] <= c["diff"]["hi"] and 0 < c["diff"]["p"] <= 1
    recs = records(study)
    assert sorted((r["method"], r["seed"]) for r in recs) == sorted((m, s) for m in METHODS
                                                                    for s in (0, 1))
    assert all(r["status"] == "ok" and r["iter"] == 4 and r["loss_A"] is not None for r in recs)

    stamps = [p.stat().st_mtime_ns for p in sorted(study.glob("runs/*/log.jsonl"))]
    capsys.readouterr()
    assert reproduce.main(args(study, "--jobs=2")) == 0
    assert "4 cached" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in sorted(study.glob("runs/*/log.jsonl"))] == stamps
    assert len(records(study)) == 4 and (study / "table.md").read_text() == table


def test_jobs_1_gives_the_records_of_jobs_2(study, tmp_path):
    """Same flags and thread count: the same numbers, to the last bit (Standard only, for time)."""
    assert reproduce.main(args(tmp_path, "--jobs=1", methods=["Standard"])) == 0
    key = lambda r: (r["method"], r["seed"], r["sig"], r["acc"], r["val_bits"], r["loss_A"])
    assert sorted(map(key, records(tmp_path))) == sorted(key(r) for r in records(study)
                                                         if r["method"] == "Standard")


def test_a_failed_run_is_marked_failed_the_study_goes_on_and_ends_non_zero(
        study, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(reproduce.METHODS, "Broken", "--masking=bogus")  # train.py exits 1
    out = tmp_path / "out"
    cached_copy(study, out)
    assert reproduce.main(args(out, "--jobs=2", methods=["Standard", "Broken"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: 2 of 4 runs FAILED") and "masking" in err[-1]
    table = (out / "table.md").read_text()
    broken = next(line for line in table.splitlines() if line.startswith("| Broken | "))
    assert "| 0 + 2 FAILED | — ± — |" in broken and "FAILED FAILED" in broken
    assert "0.000" not in broken and "| Standard | 2 | " in table
    assert "| Broken | Standard | 0 | — (< 2 paired seeds) |" in table
    assert "- Broken seed 0: train.py exited with status 1: unknown --masking=bogus" in table
    failed = [r for r in records(out) if r["status"] == "failed"]
    assert len(failed) == 2 and all("bogus" in r["reason"] and "acc" not in r for r in failed)
    assert reproduce.main(args(out, methods=["Standard", "Broken"])) == 2  # retried, not cached
    assert "2 cached" in capsys.readouterr().out


def test_final_result_rejects_non_finite_values_and_a_missing_final_evaluation(tmp_path):
    def result(*log):
        (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        return reproduce.final_result(tmp_path, 0, 4)
    end = {"iter": 4, "val_nats": 1.0, "val_bits": 1.4, "acc": 0.5}
    assert result({"iter": 0, "val_bits": 3.0, "acc": 0.0}, end)["acc"] == 0.5
    with pytest.raises(ValueError, match="non-finite loss .* at iteration 2"):
        result({"iter": 2, "loss": math.nan, "grad_norm": 1.0}, end)
    with pytest.raises(ValueError, match="non-finite val_bits"):
        result({**end, "val_bits": math.inf})
    with pytest.raises(ValueError, match="no final evaluation"):
        result({"iter": 0, "val_bits": 3.0, "acc": 0.0})


def test_claims_follow_the_intervals_over_the_seeds_where_both_runs_succeeded(tmp_path):
    base = [0.30, 0.50, 0.40, 0.60, 0.45, 0.55]
    arms = {"Standard": base,
            "P-POTS+MIRROR": [0.8 + 0.1 * (b - 0.45) if s != 3 else None  # seed 3 failed
                              for s, b in enumerate(base)],  # higher, std x 0.1, min 0.785
            "P-POTS+MIRROR-paper": [0.05, 0.35, 0.25, 0.30, 0.20, 0.40]}  # lower, std x 1.15
    jobs = [dict(method=m, seed=s, conf=reproduce.train_config([]), record=dict(
        status="failed" if a is None else "ok", seed=s, acc=a, reason="exit 1", val_bits=1.0,
        loss_A=None, loss_B=None, loss_C=None, seconds=1.0))
        for m, accs in arms.items() for s, a in enumerate(accs)]
    cfg = dict(methods=list(arms), seeds=6, max_iters=10, task_args="", train_args="")
    summary = reproduce.summarise(cfg, jobs)
    ours, paper = summary["comparisons"]  # each against Standard; Standard-2x is not in the study
    assert (ours["ref"], ours["seeds"], paper["seeds"]) == ("Standard", [0, 1, 2, 4, 5], [*range(6)])
    assert ours["diff"]["diff"] == pytest.approx(0.359)
    assert ours["std_ratio"]["ratio"] == pytest.approx(0.1)
    assert (ours["diff_verdict"], ours["std_verdict"]) == ("higher", "lower")
    assert (paper["diff_verdict"], paper["std_verdict"]) == ("lower", "not detectable")
    assert ours["claims"] == dict(mean_up="holds", std_down="holds", best_ref=0.6,
                                  worst_ours=pytest.approx(0.785), best_below_worst=True)
    assert paper["claims"]["mean_up"] == "contradicted"
    assert paper["claims"]["std_down"] == "not detectable"
    assert summary["methods"]["P-POTS+MIRROR"]["failed"] == [dict(seed=3, reason="exit 1")]
    reproduce.write_table(summary, tmp_path / "table.md")
    table = (tmp_path / "table.md").read_text()
    assert "| P-POTS+MIRROR | 5 + 1 FAILED | 0.799 ± 0.010 | " in table
    assert "0.795 FAILED 0.800" in table
    assert "| P-POTS+MIRROR | Standard | 5 | +0.359 [+0.276, +0.467], p = 0.062 | higher | " in table
    assert "| P-POTS+MIRROR | Standard | holds | holds | holds: best Standard 0.600, worst " in table
    assert ("| P-POTS+MIRROR-paper | Standard | contradicted | not detectable | does not hold: "
            in table)
    assert "- P-POTS+MIRROR seed 3: exit 1" in table


def test_a_torn_last_line_is_dropped_and_a_corrupt_middle_line_is_named(study, tmp_path, capsys):
    out = tmp_path / "torn"
    cached_copy(study, out)
    good = (out / "runs.jsonl").read_text()
    with open(out / "runs.jsonl", "a") as f:
        f.write('{"method": "Standard", "se')  # a study killed mid-write
    assert reproduce.main(args(out)) == 0
    assert "0 to train" in capsys.readouterr().out
    assert sorted((out / "runs.jsonl").read_text().splitlines()) == sorted(good.splitlines())

    lines = good.splitlines()
    (out / "runs.jsonl").write_text("\n".join(lines[:1] + ["{oops"] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match=r"runs.jsonl line 2 is corrupt"):
        reproduce.main(args(out))


def test_bad_input_is_one_value_error_before_anything_is_written(tmp_path, monkeypatch):
    out = tmp_path / "new"
    (tmp_path / "file").write_text("keep")
    for extra, needle in [(["--seeds=0"], "--seeds must be >= 1, got 0"),
                          (["--max_iters=-1"], "--max_iters must be >= 1"),
                          (["--jobs=0"], "--jobs must be >= 1"),
                          (["--methods=Standard,Nope"], "unknown method 'Nope'"),
                          (["--train_args=--no_such_flag=1"], "Standard: train.py flags: unknown"),
                          ([f"--out={tmp_path / 'file'}"], "is a file, not a directory"),
                          ([f"--out={tmp_path / 'file' / 'sub'}"], "is a file, not a directory")]:
        with pytest.raises(ValueError, match=needle):
            reproduce.main([f"--out={out}", "--methods=Standard", *extra])
    monkeypatch.setattr(reproduce.os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match="is not writable"):
        reproduce.main([f"--out={out}"])
    assert not out.exists() and (tmp_path / "file").read_text() == "keep"


def test_standard_2x_doubles_the_study_batch_and_forward_rows_follow_the_flags():
    cfg = reproduce.parse(["--methods=Standard-2x,MIRROR,MIRROR-paper,P-POTS",
                           "--task_args=--task=sort --batch_size=24", "--max_iters=100"])
    rows = {j["method"]: reproduce.forward_rows(j["conf"])
            for j in reproduce.plan(cfg) if j["seed"] == 0}
    assert rows == {"Standard-2x": (100 * 48, 0), "MIRROR": (100 * 12 * 2, 0),
                    "MIRROR-paper": (100 * 24 * 2, 0), "P-POTS": (100 * 24, 8832)}
    cfg = reproduce.parse(["--methods=Standard-2x", "--train_args=--batch_size=40"])
    assert reproduce.train_flags(cfg, "Standard-2x", 0)[-2:] == ["--batch_size=40", "--batch_size=80"]
