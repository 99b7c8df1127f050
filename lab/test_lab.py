"""The lab's tests (lab/: the studies, their statistics, the standalone variance table, the study
figures, the bench), run with the reference's as the README says: python -m pytest -q test_all.py lab
(-m "not e2e" skips the tests marked e2e, which run a script end to end, for a fast subset). The
helpers and the tiny finished run come from test_all.py: the lab imports the root, never the reverse.

What it checks, section by section:
- bad input: lab.variance_table, lab.bench and lab.plots, run as `python -m lab.<name>`, turn a
  ValueError into one `error:` line and a non-zero exit; a table of their bad flags, each refused
  in-process before a finished run's out_dir changes (byte for byte).
- lab.reproduce and lab.study: the final evaluation is recorded and a changed budget reuses nothing;
  --quick loses to explicit flags; the method's flags come after the task's and extra flags last;
  {out} in flags is the absolute --out; the script's bad input is one `error:` line.
- lab.bench prints every figure.
- lab.stats: intervals and verdicts on known cases (identical arms: CI covers 0 and p >= 0.05 in
  >= 90 % of repeats; a shifted arm is detected); exact and Monte Carlo permutation p-values; the
  std ratio; bootstrap coverage; t quantiles and formatting; bad input.
- lab.reproduce (a tiny study): every row with intervals and claims, and a second call trains
  nothing; --jobs does not change the records; failed runs are marked, never 0.000, and the study
  ends non-zero; a run's record keeps clipped steps, curve and epochs; claims follow the intervals
  over the seeds where both runs succeeded; a torn cache line is dropped and a corrupt one named;
  bad input is one ValueError before anything is written; Standard-2x doubles the batch and
  forward rows follow the flags.
- lab.variance_table: the x0 bootstrap covers the truth at the nominal rate and pairs ratios.
- lab.plots: each figure (with the root's plot_ppots and plot_variance) writes a PNG.
- lab.reproduce_sft: a tiny SFT study writes every arm's row and its step-0 variance; pretraining is
  reused only under the same flags.
Statistical checks use fixed seeds and tolerances derived from the Monte Carlo standard error."""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import figures
from lab import plots, reproduce, reproduce_sft, stats, study
from lab.variance_table import bootstrap_x0
from samplers import PPOTS
from test_all import (HERE, T, T_GRID, _one_error_line, fresh_copy, gen, run, run_inproc, snapshot,
                      synthetic_sqrt_m)

# torch's forward-mode AD (variance.measure, target='grad': reproduce_sft's step-0 variance) loads
# jit-scripted decompositions on first use
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


# ----------------------------------------------------------------------------- bad input
@pytest.mark.e2e
def test_the_lab_scripts_give_one_clear_error_line(tmp_path):
    """Each lab script, run as `python -m lab.<name>`, turns its ValueError into one `error:` line
    and a non-zero exit (the in-process table below relies on it)."""
    _one_error_line(run("lab.variance_table", f"--out_dir={tmp_path / 'nowhere'}", check=False), "not found")
    _one_error_line(run("lab.bench", "--repeats=1", check=False), "repeats")
    _one_error_line(run("lab.plots", f"--run={tmp_path / 'nowhere'}", check=False), "not found")


BAD_LAB = [  # (module, flags after --out_dir or the like, words); in-process, against a finished run
    ("lab.variance_table", ["--n_x0=0"], "n_x0"), ("lab.variance_table", ["--n_masks=1"], "n_masks"),
    ("lab.variance_table", ["--n_boot=0"], "n_boot"), ("lab.bench", ["--repeats=1"], "repeats"),
    ("lab.bench", ["--batch_size=1"], "batch_size"), ("lab.bench", ["--device=tpu"], "device"),
    ("lab.plots", ["--run=no_such_run"], "not found"),
]


@pytest.mark.e2e
@pytest.mark.parametrize("script, flags, words", BAD_LAB, ids=[f"{s} {' '.join(f)}" for s, f, _ in BAD_LAB])
def test_the_lab_scripts_refuse_bad_input_before_any_work(finished_run, tmp_path, script, flags, words):
    out = fresh_copy(finished_run, tmp_path)
    before = snapshot(out)
    where = [] if script in ("lab.bench", "lab.plots") else [f"--out_dir={out}"]
    with pytest.raises(ValueError, match=words):
        run_inproc(script, *where, *flags)
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- lab.reproduce and lab.study: flags
TINY_TRAIN = ("--n_layer=1 --n_head=2 --n_embd=32 --num_digits=4 --eval_problems=32 --eval_iters=1 "
              "--variance_n_x0=4 --variance_grad_n_x0=2")


def reproduce_cli(*args):
    return subprocess.run([sys.executable, "-m", "lab.reproduce", *args], capture_output=True,
                          text=True, cwd=HERE, timeout=300)


@pytest.mark.e2e
def test_reproduce_records_the_final_evaluation_and_a_changed_budget_reuses_nothing(study_out, tmp_path,
                                                                                   capsys):
    recs = run_records(study_out)
    for r in recs:  # the final iteration was evaluated and its variance measured
        assert r["iter"] == 4 and 0 <= r["acc"] <= 1 and r["loss_A"] is not None and r["grad_C"] is not None
    out = tmp_path / "out"
    cached_copy(study_out, out)
    capsys.readouterr()
    assert reproduce.main(study_args(out, "--seeds=1", "--max_iters=5", methods=["Standard"])) == 0
    assert "0 cached" in capsys.readouterr().out  # a new budget reuses nothing


def test_reproduce_quick_preset_loses_to_explicit_flags():
    scratch = reproduce.SCRATCH
    quick = study.parse(scratch, ["--quick"])
    assert quick["seeds"] == scratch.quick["seeds"] and quick["max_iters"] == scratch.quick["max_iters"]
    assert study.parse(scratch, ["--seeds=3", "--quick"])["seeds"] == 3
    assert study.parse(scratch, [])["methods"] == list(scratch.methods)


def test_reproduce_train_flags_put_method_after_task_and_extra_args_last():
    cfg = study.parse(reproduce.SCRATCH, ["--methods=MIRROR", "--train_args=--masking=pair --n_layer=1"])
    flags = study.train_flags(reproduce.SCRATCH, cfg, "MIRROR", 3)
    assert flags[0] == "--seed=3" and flags[-2:] == ["--masking=pair", "--n_layer=1"]
    assert flags.index("--masking=mirror") > flags.index("--batch_size=32")
    assert study.signature(flags) != study.signature(study.train_flags(reproduce.SCRATCH, cfg, "MIRROR", 4))


def test_study_flags_put_the_absolute_out_path_in_place_of_out(tmp_path, monkeypatch):
    monkeypatch.setitem(reproduce.SCRATCH.methods, "Fine-tune", "--init_from={out}/pretrain/ckpt.pt")
    monkeypatch.chdir(tmp_path)
    cfg = study.parse(reproduce.SCRATCH, ["--out=my results", "--methods=Fine-tune",
                                          "--task_args=--task=sort --data_path={out}/x.txt"])
    (job,) = [j for j in study.plan(reproduce.SCRATCH, cfg) if j["seed"] == 0]
    out = str(tmp_path / "my results")
    assert f"--data_path={out}/x.txt" in job["flags"] and job["flags"][-1] == f"--init_from={out}/pretrain/ckpt.pt"
    assert job["conf"]["init_from"] == f"{out}/pretrain/ckpt.pt"


@pytest.mark.e2e
def test_reproduce_bad_input_gives_one_clear_error_line(tmp_path):
    proc = reproduce_cli(f"--out={tmp_path}", "--methods=Standard,Nope")  # the script's one line
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "unknown method 'Nope'" in lines[0], proc.stderr
    for args, needle in [(["--bogus=1"], "unknown flag --bogus"), (["--seeds=0"], "--seeds"),
                         (["--seeds=two"], "--seeds expects int"),
                         (["--methods=Standard", "--seeds=1", "--train_args=--no_such_flag=1"],
                          "unknown flag --no_such_flag")]:
        with pytest.raises(ValueError, match=re.escape(needle)):  # the ValueError behind that line
            reproduce.main([f"--out={tmp_path}", *args])


# ----------------------------------------------------------------------------- lab.bench
@pytest.mark.e2e
def test_bench_prints_every_figure():
    out = run("lab.bench", "--n_layer=1", "--n_head=2", "--n_embd=32", "--num_digits=4", "--batch_size=16",
              "--warmup=1", "--repeats=3", "--gen_rows=4", "--max_iters=10", "--variance_interval=5").stdout
    for label in ("floor: fwd + bwd + AdamW", "standard + uniform t", "MIRROR, matched rows", "pair, matched rows",
                  "P-POTS t (fitted), standard", "uniform.sample(16)", "ppots.sample(16)", "variance logging (loss + grad)",
                  "P-POTS measure + fit", "1 step", "4 steps"):
        line = next(ln for ln in out.splitlines() if ln.startswith(label))
        assert float(line[len(label):].split()[0].replace(",", "")) > 0, line


# ----------------------------------------------------------------------------- lab.stats: intervals
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


# ----------------------------------------------------------------------------- lab.reproduce: intervals, failed runs, cache, jobs
STUDY_FLAGS = ("--n_layer=1 --n_head=2 --n_embd=32 --num_digits=4 --eval_problems=32 --eval_iters=1 "
        "--batch_size=16 --variance_n_x0=4 --variance_grad_n_x0=2")
STUDY_METHODS = ["Standard", "P-POTS+MIRROR"]


def study_args(out, *extra, methods=STUDY_METHODS):
    return [f"--out={out}", f"--methods={','.join(methods)}", "--seeds=2", "--max_iters=4",
            "--threads=1", f"--train_args={STUDY_FLAGS}", *extra]


def run_records(out):
    return [json.loads(line) for line in open(os.path.join(out, "runs.jsonl"))]


@pytest.fixture(scope="module")
def study_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    assert reproduce.main(study_args(out, "--jobs=2")) == 0
    return out


def cached_copy(study_out, out):
    """A fresh --out holding only the study's runs.jsonl: its runs are cached there."""
    os.makedirs(out)
    shutil.copy(study_out / "runs.jsonl", out / "runs.jsonl")


@pytest.mark.e2e
def test_tiny_study_writes_every_row_with_intervals_and_claims_and_a_second_call_trains_nothing(
        study_out, capsys):
    table = (study_out / "table.md").read_text()
    for m in STUDY_METHODS:
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
    summary = json.load(open(study_out / "summary.json"))
    rows = {m: (s["forward_rows"], s["curve_rows"]) for m, s in summary["methods"].items()}
    assert rows == {"Standard": (4 * 16, 0), "P-POTS+MIRROR": (4 * 8 * 2, 69 * 32 * 4 * 2)}
    (c,) = summary["comparisons"]
    assert (c["method"], c["ref"], c["seeds"]) == ("P-POTS+MIRROR", "Standard", [0, 1])
    assert c["diff"]["lo"] <= c["diff"]["diff"] <= c["diff"]["hi"] and 0 < c["diff"]["p"] <= 1
    recs = run_records(study_out)
    assert sorted((r["method"], r["seed"]) for r in recs) == sorted((m, s) for m in STUDY_METHODS
                                                                    for s in (0, 1))
    assert all(r["status"] == "ok" and r["iter"] == 4 and r["loss_A"] is not None for r in recs)

    stamps = [p.stat().st_mtime_ns for p in sorted(study_out.glob("runs/*/log.jsonl"))]
    capsys.readouterr()
    assert reproduce.main(study_args(study_out, "--jobs=2")) == 0
    assert "4 cached" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in sorted(study_out.glob("runs/*/log.jsonl"))] == stamps
    assert len(run_records(study_out)) == 4 and (study_out / "table.md").read_text() == table


@pytest.mark.e2e
def test_jobs_1_gives_the_records_of_jobs_2(study_out, tmp_path):
    """Same flags and thread count: the same numbers, to the last bit (Standard seed 0 only, for
    time)."""
    assert reproduce.main(study_args(tmp_path, "--jobs=1", "--seeds=1", methods=["Standard"])) == 0
    key = lambda r: (r["method"], r["seed"], r["sig"], r["acc"], r["val_bits"], r["loss_A"])
    assert sorted(map(key, run_records(tmp_path))) == sorted(key(r) for r in run_records(study_out)
                                                         if r["method"] == "Standard" and r["seed"] == 0)


@pytest.mark.e2e
def test_a_failed_run_is_marked_failed_the_study_goes_on_and_ends_non_zero(
        study_out, tmp_path, monkeypatch, capsys):
    # flags that pass the study's checks, but train.py exits 1 when it looks for the checkpoint
    monkeypatch.setitem(reproduce.SCRATCH.methods, "Broken", "--init_from=bogus/ckpt.pt")
    out = tmp_path / "out"
    cached_copy(study_out, out)
    assert reproduce.main(study_args(out, "--jobs=2", methods=["Standard", "Broken"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: 2 of 4 runs FAILED") and "init_from" in err[-1]
    table = (out / "table.md").read_text()
    broken = next(line for line in table.splitlines() if line.startswith("| Broken | "))
    assert "| 0 + 2 FAILED | — ± — |" in broken and "FAILED FAILED" in broken
    assert "0.000" not in broken and "| Standard | 2 | " in table
    assert "| Broken | Standard | 0 | — (< 2 paired seeds) |" in table
    assert "- Broken seed 0: train.py exited with status 1: --init_from must be" in table
    failed = [r for r in run_records(out) if r["status"] == "failed"]
    assert len(failed) == 2 and all("bogus" in r["reason"] and "acc" not in r for r in failed)
    assert reproduce.main(study_args(out, methods=["Standard", "Broken"])) == 2  # retried, not cached
    assert "2 cached" in capsys.readouterr().out


def test_final_result_rejects_non_finite_values_and_a_missing_final_evaluation(tmp_path):
    def result(*log):
        (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        return study.final_result(tmp_path, 0, 4)
    end = {"iter": 4, "val_nats": 1.0, "val_bits": 1.4, "acc": 0.5}
    assert result({"iter": 0, "val_bits": 3.0, "acc": 0.0}, end)["acc"] == 0.5
    with pytest.raises(ValueError, match="non-finite loss .* at iteration 2"):
        result({"iter": 2, "loss": math.nan, "grad_norm": 1.0}, end)
    with pytest.raises(ValueError, match="non-finite val_bits"):
        result({**end, "val_bits": math.inf})
    with pytest.raises(ValueError, match="no final evaluation"):
        result({"iter": 0, "val_bits": 3.0, "acc": 0.0})


def test_final_result_returns_clip_frac_curve_and_epochs_when_logged(tmp_path):
    log = [{"iter": 0, "val_bits": 3.0, "acc": 0.0}, {"iter": 2, "loss": 1.0, "clip_frac": 0.5},
           {"iter": 2, "val_bits": 2.0, "acc": 0.25, "epoch": 1.5}, {"iter": 4, "loss": 0.5, "clip_frac": 0.0},
           {"iter": 4, "val_nats": 1.0, "val_bits": 1.4, "acc": 0.5, "epoch": 3.0}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    res = study.final_result(tmp_path, 0, 4)
    assert (res["acc"], res["clip_frac"], res["epochs"]) == (0.5, 0.25, 3.0)
    assert res["curve"] == [[0, 0.0], [2, 0.25], [4, 0.5]]
    (tmp_path / "log.jsonl").write_text(json.dumps({"iter": 4, "val_bits": 1.4, "acc": 0.5}) + "\n")
    res = study.final_result(tmp_path, 0, 4)
    assert (res["clip_frac"], res["epochs"], res["curve"]) == (None, None, [[4, 0.5]])


def test_claims_follow_the_intervals_over_the_seeds_where_both_runs_succeeded(tmp_path):
    base = [0.30, 0.50, 0.40, 0.60, 0.45, 0.55]
    arms = {"Standard": base,
            "P-POTS+MIRROR": [0.8 + 0.1 * (b - 0.45) if s != 3 else None  # seed 3 failed
                              for s, b in enumerate(base)],  # higher, std x 0.1, min 0.785
            "P-POTS+MIRROR-paper": [0.05, 0.35, 0.25, 0.30, 0.20, 0.40]}  # lower, std x 1.15
    jobs = [dict(method=m, seed=s, conf=study.run_config([]), record=dict(
        status="failed" if a is None else "ok", seed=s, acc=a, reason="exit 1", val_bits=1.0,
        loss_A=None, loss_B=None, loss_C=None, seconds=1.0))
        for m, accs in arms.items() for s, a in enumerate(accs)]
    cfg = dict(methods=list(arms), seeds=6, max_iters=10, task_args="", train_args="")
    summary = study.summarise(reproduce.SCRATCH, cfg, jobs)
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
    study.write_table(reproduce.SCRATCH, summary, tmp_path / "table.md")
    table = (tmp_path / "table.md").read_text()
    assert "| P-POTS+MIRROR | 5 + 1 FAILED | 0.799 ± 0.010 | " in table
    assert "| loss C | clipped steps | forward rows / run |" in table
    assert summary["methods"]["Standard"]["clip_frac"] is None  # no record logged it: "—"
    assert "0.795 FAILED 0.800" in table
    assert "| P-POTS+MIRROR | Standard | 5 | +0.359 [+0.276, +0.467], p = 0.062 | higher | " in table
    assert "| P-POTS+MIRROR | Standard | holds | holds | holds: best Standard 0.600, worst " in table
    assert ("| P-POTS+MIRROR-paper | Standard | contradicted | not detectable | does not hold: "
            in table)
    assert "- P-POTS+MIRROR seed 3: exit 1" in table


@pytest.mark.e2e
def test_a_torn_last_line_is_dropped_and_a_corrupt_middle_line_is_named(study_out, tmp_path, capsys):
    out = tmp_path / "torn"
    cached_copy(study_out, out)
    good = (out / "runs.jsonl").read_text()
    with open(out / "runs.jsonl", "a") as f:
        f.write('{"method": "Standard", "se')  # a study killed mid-write
    assert reproduce.main(study_args(out)) == 0
    assert "0 to train" in capsys.readouterr().out
    assert sorted((out / "runs.jsonl").read_text().splitlines()) == sorted(good.splitlines())

    lines = good.splitlines()
    (out / "runs.jsonl").write_text("\n".join(lines[:1] + ["{oops"] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match=r"runs.jsonl line 2 is corrupt"):
        reproduce.main(study_args(out))


def test_bad_input_is_one_value_error_before_anything_is_written(tmp_path, monkeypatch):
    out = tmp_path / "new"
    (tmp_path / "file").write_text("keep")
    for extra, needle in [(["--seeds=0"], "--seeds must be >= 1, got 0"),
                          (["--max_iters=-1"], "--max_iters must be >= 1"),
                          (["--jobs=0"], "--jobs must be >= 1"),
                          (["--methods=Standard,Nope"], "unknown method 'Nope'"),
                          (["--train_args=--no_such_flag=1"], "Standard: train.py flags: unknown"),
                          (["--train_args=--batch_size=0"], "Standard: train.py flags: --batch_size=0"),
                          (["--train_args=--masking=mirror --batch_size=33"], "must be even"),
                          ([f"--out={tmp_path / 'file'}"], "is a file, not a directory"),
                          ([f"--out={tmp_path / 'file' / 'sub'}"], "is a file, not a directory")]:
        with pytest.raises(ValueError, match=needle):
            reproduce.main([f"--out={out}", "--methods=Standard", *extra])
    monkeypatch.setattr(study.os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match="is not writable"):
        reproduce.main([f"--out={out}"])
    assert not out.exists() and (tmp_path / "file").read_text() == "keep"


def test_standard_2x_doubles_the_study_batch_and_forward_rows_follow_the_flags():
    scratch = reproduce.SCRATCH
    cfg = study.parse(scratch, ["--methods=Standard-2x,MIRROR,MIRROR-paper,P-POTS",
                                "--task_args=--task=sort --batch_size=24", "--max_iters=100"])
    rows = {j["method"]: study.forward_rows(j["conf"], scratch.curve_rows)
            for j in study.plan(scratch, cfg) if j["seed"] == 0}
    assert rows == {"Standard-2x": (100 * 48, 0), "MIRROR": (100 * 12 * 2, 0),
                    "MIRROR-paper": (100 * 24 * 2, 0), "P-POTS": (100 * 24, 8832)}
    cfg = study.parse(scratch, ["--methods=Standard-2x", "--train_args=--batch_size=40"])
    assert study.train_flags(scratch, cfg, "Standard-2x", 0)[-2:] == ["--batch_size=40", "--batch_size=80"]


# ----------------------------------------------------------------------------- lab.variance_table: the x0 bootstrap
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


# ----------------------------------------------------------------------------- lab.plots (with the root's figures)
def test_each_figure_writes_a_png(tmp_path):
    sampler = PPOTS(T_GRID, synthetic_sqrt_m(T_GRID), fit="none", support="grid")
    res = lambda s: dict(A=0.4 * s, B=0.05 * s, C=-0.001 * s)
    curve = dict(t=T_GRID.float(), m=synthetic_sqrt_m(T_GRID).float() ** 2,
                 g=torch.ones(T - 1), v=1 / T_GRID.float())
    calls = {"ppots.png": lambda p: figures.plot_ppots(sampler, p),
             "variance.png": lambda p: figures.plot_variance(
                 [{"iter": i, "loss": res(1), "grad": res(i)} for i in (0, 250, 500)], p),
             "variance_negative_B.png": lambda p: figures.plot_variance(  # open markers, no total
                 [{"iter": i, "loss": dict(A=0.4, B=-0.02, C=1e-5), "grad": dict(A=3.0, B=-1.0,
                                                                                 C=0.0)}
                  for i in (0, 100)], p),
             "components.png": lambda p: plots.plot_components(
                 {"standard": curve, "pair": curve, "mirror": curve}, p)}
    for name, plot in calls.items():
        plot(tmp_path / name)
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert "matplotlib.pyplot" not in sys.modules  # figures set no global matplotlib state


# ----------------------------------------------------------------------------- lab.reproduce_sft: the SFT study
@pytest.mark.e2e
def test_tiny_sft_study_writes_every_arm_and_its_step0_variance(tmp_path, monkeypatch):
    """Every arm, 1 seed, tiny model and budget: pretraining, the table, variance.md, the figure.
    P-POTS without its EPR fit and a small step-0 variance keep it under a minute (the EPR fit and
    variance.measure have their own tests)."""
    tiny = "--n_layer=1 --n_head=2 --n_embd=32 --batch_size=16 --variance_interval=0 --seed=0"
    args = [f"--out={tmp_path}", "--seeds=1", "--max_iters=4", "--jobs=2", "--threads=1",
            f"--pretrain_args=--task=mix --num_digits=4 --max_iters=3 --eval_interval=3 {tiny}",
            "--task_args=--task=twosort --num_digits=4 --train_size=40 --batch_size=8 "
            "--eval_problems=8 --eval_iters=1 --variance_interval=0 --ppots_fit_iter=0 --log_interval=2 "
            "--ppots_fit=none", "--train_args=--eval_interval=2"]
    monkeypatch.setattr(reproduce_sft, "STEP0", dict(n_x0=8, n_t=4, n_masks=2, n_proj=2))
    assert reproduce_sft.main(args) == 0
    table = (tmp_path / "table.md").read_text()
    variance_md = (tmp_path / "variance.md").read_text()
    for arm in reproduce_sft.METHODS:
        assert f"| {arm} | 1 | " in table and f"\n| {arm} | " in variance_md
    assert "| Standard-2x | 16 | " in variance_md and "| MIRROR | 4 | " in variance_md  # clean rows
    recs = run_records(tmp_path)
    assert all(r["status"] == "ok" and r["clip_frac"] is not None and r["epochs"] > 0 for r in recs)
    assert all([it for it, _ in r["curve"]] == [2, 4] for r in recs)  # no step 0: report() has it
    assert "before SFT (step 0" in variance_md and (tmp_path / "curves.png").stat().st_size > 0


def test_sft_pretraining_is_reused_only_under_the_same_flags(tmp_path, monkeypatch):
    cfg = study.parse(reproduce_sft.SFT, [f"--out={tmp_path}"])
    for kind in ("mdm", "arm"):
        os.makedirs(tmp_path / "pretrain" / kind)
        json.dump(reproduce_sft.pretrain_flags(cfg, kind), open(tmp_path / "pretrain" / kind / "flags.json", "w"))
    monkeypatch.setattr(reproduce_sft.subprocess, "Popen", lambda *a, **k: pytest.fail("pretrained again"))
    reproduce_sft.prepare(cfg, [])  # both cached: nothing runs
    with pytest.raises(ValueError, match="pretrained with other flags: use a fresh --out"):
        reproduce_sft.prepare(dict(cfg, pretrain_args=cfg["pretrain_args"] + " --max_iters=7"), [])
