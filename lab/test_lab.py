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
  >= 90 % of repeats; a shifted arm is detected); a verdict needs the CI and the test, and n <= 5
  seeds (or a large Holm family) is 'untestable'; Holm on textbook p-values; exact and Monte Carlo
  permutation p-values; the std ratio and its label-swap test (by hand, and its size under a mean
  shift); a zero-std arm or one near a bound is 'at ceiling'/'at floor'; the std power simulation
  against the F test's closed form, and its calls against verdict(); bootstrap coverage; t
  quantiles and formatting; bad input.
- lab.reproduce (a tiny study): every row with intervals and claims, and a second call trains
  nothing; --jobs does not change the records; failed runs are marked, never 0.000, and the study
  ends non-zero; a run's record keeps clipped steps, curve, problems and epochs; claims follow the
  intervals and Holm within the primary family at every point, over the seeds where both runs
  succeeded, with eval SE, the curve's share and the std power in the table; two seeds are
  untestable and a zero-std arm is at ceiling; a torn cache line is dropped and a corrupt one named;
  bad input is one ValueError before anything is written; Standard-2x doubles the batch and
  forward rows follow the flags.
- lab.retable: the documented from-scratch study's per-seed counts give the verdicts
  docs/results.md quotes.
- lab.variance_table: the x0 bootstrap covers the truth at the nominal rate and pairs ratios.
- lab.plots: each figure (with the root's plot_ppots and plot_variance) writes a PNG.
- lab.reproduce_sft: a tiny SFT study writes every arm's row and its step-0 variance; pretraining is
  reused only under the same flags.
- lab.reproduce_text: a tiny text study writes every arm's row, its end-of-run variance, every
  P-POTS fit and the figure; its defaults pin the val rows across batch sizes and refit P-POTS;
  under the val ELBO lower is the better claim and the eval SE is the runs' RMS error; the primary
  pairs' per-step loss variance is paired by seed and Holm-corrected.
Statistical checks use fixed seeds and tolerances derived from the Monte Carlo standard error."""
import dataclasses
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
from lab import plots, record, reproduce, reproduce_sft, reproduce_text, retable, stats, study
from lab.table import write_table
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
    _one_error_line(run("lab.bench", "--blocks=1", check=False), "blocks")
    _one_error_line(run("lab.plots", f"--run={tmp_path / 'nowhere'}", check=False), "not found")


BAD_LAB = [  # (module, flags after --out_dir or the like, words); in-process, against a finished run
    ("lab.variance_table", ["--n_x0=0"], "n_x0"), ("lab.variance_table", ["--n_masks=1"], "n_masks"),
    ("lab.variance_table", ["--n_boot=0"], "n_boot"), ("lab.bench", ["--blocks=1"], "blocks"),
    ("lab.bench", ["--batch_size=1"], "batch_size"), ("lab.bench", ["--device=tpu"], "device"),
    ("lab.bench", ["--block_steps=0"], "block_steps"), ("lab.bench", ["--compile=max"], "compile"),
    ("lab.bench", ["--variants=floor,MIRROR"], "variants"),
    ("lab.bench", ["--n_embd=2000000", "--n_head=1"], "n_embd"), ("lab.bench", ["--gpu_check=True"], "CUDA")
    if not torch.cuda.is_available() else ("lab.bench", ["--warmup=0"], "warmup"),
    ("lab.variance_table", ["--n_t=1"], "n_t"), ("lab.variance_table", ["--n_batches=0"], "n_batches"),
    ("lab.variance_table", ["--grad_n_x0=1"], "grad_n_x0"),
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


def test_plots_check_every_input_before_writing_a_file(finished_run, tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    for summary, words in (("{}", "not a study's summary.json"), ("not json", "cannot be read as JSON")):
        (study / "summary.json").write_text(summary)
        with pytest.raises(ValueError, match=words):
            run_inproc("lab.plots", f"--run={finished_run}", f"--study={study}", "--sft=", "--text=", f"--ckpt={finished_run}",
                       f"--assets={tmp_path / 'assets'}")
        assert not (tmp_path / "assets").exists()


def test_the_sft_study_refuses_bad_flags_before_creating_its_folder(tmp_path):
    for args, words in ((["--seeds=0"], "seeds"), (["--methods=bogus"], "unknown method"), (["--jobs=0"], "jobs"),
                        (["--max_iters=0"], "max_iters"), (["--train_args=--batch_size=0"], "batch_size"),
                        (["--task_args=--learning_rate=1e999"], "not a finite number"),
                        (["--pretrain_args=--n_embd=-1"], "pretraining the MDM: train.py flags: --n_embd=-1")):
        with pytest.raises(ValueError, match=words):
            reproduce_sft.main([f"--out={tmp_path / 'sft'}", *args])
        assert not (tmp_path / "sft").exists()


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
def test_bench_prints_every_figure_and_counts_no_sync_in_any_step():
    out = run("lab.bench", "--n_layer=1", "--n_head=2", "--n_embd=32", "--num_digits=4", "--batch_size=16",
              "--warmup=1", "--blocks=3", "--block_steps=2", "--gen_rows=4", "--max_iters=10",
              "--variance_interval=5").stdout
    lines = out.splitlines()
    for label in ("floor", "staged", "standard", "MIRROR", "pair", "P-POTS"):
        ms, tokens_per_s, syncs = next(ln for ln in lines if ln.split()[:1] == [label]).split()[1:]
        assert float(ms) > 0 and float(tokens_per_s.replace(",", "")) > 0 and float(syncs) == 0, label
    for label in ("staged / floor", "standard / floor", "MIRROR / standard", "uniform.sample(16)",
                  "ppots.sample(16)", "sort batch(16) on the CPU", "draw_masks(16 rows) on the CPU",
                  "variance logging (loss + grad)", "1 step", "4 steps"):
        line = next(ln for ln in lines if ln.startswith(label))
        assert float(line[len(label):].split()[0].replace(",", "")) > 0, line
    assert re.search(r"standard / floor +[\d.]+ \[[\d.]+, [\d.]+\] +target <= 1.05: (not )?met", out)


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
    assert stats.verdict(d["lo"], d["hi"], d["p"], 10, "higher") == "holds"
    assert stats.verdict(d["lo"], d["hi"], d["p"], 10, "lower") == "contradicted"
    e = stats.paired_difference(b, a, n_boot=1000)
    assert stats.verdict(e["lo"], e["hi"], e["p"], 10, "lower") == "holds"
    assert stats.verdict(-0.1, 0.2, 0.01, 10, "higher") == "not detectable"
    assert stats.verdict(-0.1, 0.2, 0.01, 10, "lower") == "not detectable"


def test_a_verdict_needs_the_interval_and_the_test():
    """The issue's case: 2 seeds with differences (0.10, 0.15) have a CI that excludes 0 but an
    exact p of 0.5, and no 2-seed outcome can do better: 'untestable at n = 2'. From n = 6 on
    (2^-5 < 0.05) a call needs both the CI and p < alpha; a family of m Holm-adjusted tests is
    untestable while m 2^(1 - n) >= alpha (at n = 10: m >= 26)."""
    d = stats.paired_difference([0.60, 0.65], [0.50, 0.50])
    assert d["lo"] > 0 and d["p"] == 0.5
    assert stats.verdict(d["lo"], d["hi"], d["p"], 2) == "untestable at n = 2"
    assert stats.verdict(0.1, 0.2, 0.01, 5) == "untestable at n = 5"  # 2^-4 = 0.0625 >= 0.05
    assert stats.verdict(0.1, 0.2, 0.03, 6) == "holds"
    assert stats.verdict(0.1, 0.2, 0.06, 6) == "not detectable"  # the CI alone is not enough
    assert stats.verdict(-0.1, 0.2, 0.01, 6) == "not detectable"  # nor is the test alone
    assert stats.verdict(-0.2, -0.1, 0.01, 6, "higher") == "contradicted"
    assert stats.verdict(0.1, 0.2, 0.01, 10, tests=25) == "holds"  # 25 / 512 < 0.05
    assert stats.verdict(0.1, 0.2, 0.01, 10, tests=26) == "untestable at n = 10"  # 26 / 512
    assert stats.untestable(5) and not stats.untestable(6)


def test_holm_on_known_p_values():
    # The textbook case: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06,
    # 0.04, made monotone (0.04 -> 0.06); at alpha 0.05 only the two smallest are called.
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.3, 0.5, 0.9]) == pytest.approx([0.9, 1.0, 1.0])  # capped at 1
    assert stats.holm([0.02]) == [0.02] and stats.holm([]) == []
    # the from-scratch numbers: all 18 mean tests of docs/results.md in one family put
    # Clipped (p = 0.0039, 6th smallest) at 13 x 0.0039 = 0.051
    p = [0.002, 0.0039, 0.62, 0.93, 0.71, 0.38, 0.0098, 0.21, 0.002, 0.074, 0.002, 0.02, 0.002,
         0.27, 0.27, 0.0059, 0.23, 0.002]
    assert stats.holm(p)[1] == pytest.approx(13 * 0.0039)
    assert stats.holm(p)[6] == pytest.approx(11 * 0.0098)


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
    assert s["p"] == stats.std_permutation_p(a, b)


def test_std_permutation_p_by_hand_and_its_size_under_a_mean_shift():
    # n = 2, a = (1, 3), b = (0, 0.5): centred (-1, 1) and (-0.25, 0.25); swapping one seed's
    # labels gives equal stds (|log ratio| 0), the identity and the full swap log 4: p = 2/4.
    assert stats.std_permutation_p([1, 3], [0, 0.5]) == 0.5
    # a proportional to b after centring: only the identity and the full swap reach the observed
    # |log ratio|, so p = 2 / 2^10, the smallest there is
    b = np.random.default_rng(0).normal(size=10)
    assert stats.std_permutation_p(5 + 0.1 * b, b) == 2 / 2 ** 10
    # Equal stds, means 3 SDs apart: the centring keeps the mean shift from posing as a spread
    # difference. R = 400 repeats, nominal size 0.05, binomial SE 0.011: <= 0.05 + 3 SE
    # (measured 0.044 over 1000 repeats).
    rng = np.random.default_rng(1)
    rejected = sum(stats.std_permutation_p(3 + rng.normal(size=10), rng.normal(size=10)) < 0.05
                   for _ in range(400))
    assert rejected / 400 <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 400)


def test_a_zero_std_or_an_arm_at_a_bound_gives_no_std_verdict():
    spread = [0.5, 0.6, 0.7, 0.8, 0.65]
    assert stats.at_bound([1.0] * 5, spread) == "at ceiling"  # std 0
    assert stats.at_bound(spread, [1.0] * 5) == "at ceiling"  # either arm
    assert stats.at_bound([0.0] * 5, spread) == "at floor"
    assert stats.at_bound([1.0, 1.0, 1.0, 0.9, 0.95, 0.99], [0.9, 0.91, 0.92, 0.9, 0.95, 0.9]) \
        == "at ceiling"  # half the seeds at 1.000
    # docs/results.md: P-POTS+MIRROR-paper (0.944, headroom 0.056) against Standard (std 0.162)
    ppm = [0.952, 0.956, 0.932, 0.940, 0.916, 0.947, 0.950, 0.971, 0.930, 0.941]
    standard = [0.696, 0.402, 0.753, 0.636, 0.481, 0.419, 0.747, 0.585, 0.769, 0.883]
    assert stats.at_bound(ppm, standard) == "at ceiling"
    p_pots = [0.461, 0.341, 0.751, 0.730, 0.507, 0.595, 0.771, 0.602, 0.806, 0.773]
    assert stats.at_bound(p_pots, standard) is None  # a fair test


def _f_lower_rule(n, alpha=0.05):
    """The two-sided F test's call 'lower' for S pairs of independent normal samples, with its
    closed-form power: the F(n - 1, n - 1) cdf, I_{x/(1+x)}((n-1)/2, (n-1)/2), by the trapezoid
    rule (the integrand is bounded for n >= 3), and its alpha/2 quantile by inverting it."""
    k = (n - 1) / 2
    z = np.linspace(0, 1, 200_001)
    dens = np.exp((k - 1) * np.log(np.clip(z * (1 - z), 1e-300, None)) + math.lgamma(2 * k)
                  - 2 * math.lgamma(k))
    cdf = np.concatenate([[0.0], np.cumsum(dens[1:] + dens[:-1]) / 2 * (z[1] - z[0])])
    f_cdf = lambda x: float(np.interp(x / (1 + x), z, cdf))
    z_crit = float(np.interp(alpha / 2, cdf, z))
    crit = z_crit / (1 - z_crit)  # F_{alpha/2}(n - 1, n - 1)
    rule = lambda a, b: a.var(axis=1, ddof=1) / b.var(axis=1, ddof=1) < crit
    return rule, lambda ratio: f_cdf(crit / ratio ** 2)


def test_std_power_simulation_matches_the_f_test_closed_form_and_simulates_the_verdict():
    """std_power draws a ~ N(0, ratio^2), b ~ N(0, 1) and counts the rule's calls: with the F test
    as the rule its power has a closed form, and the simulation must land within 4 Monte Carlo
    SEs of it. With the default rule, each simulated call is the one verdict() makes on
    std_ratio's numbers, and below n = 6 nothing can be called."""
    for n, ratio in ((10, 0.5), (10, 0.7), (16, 0.5)):
        rule, closed = _f_lower_rule(n)
        sim = stats.std_power(n, ratio, sims=4000, rule=rule)
        assert abs(sim["power"] - closed(ratio)) <= 4 * math.sqrt(closed(ratio) * (1 - closed(ratio))
                                                                   / 4000), (n, ratio)
    assert _f_lower_rule(10)[1](1.0) == pytest.approx(0.025, abs=1e-4)  # the size, one side
    sims, n = 40, 10
    rng = np.random.default_rng(3)
    a, b = 0.5 * rng.normal(size=(sims, n)), rng.normal(size=(sims, n))  # std_power's draws
    calls = [stats.verdict(r["lo"] - 1, r["hi"] - 1, r["p"], n, "lower") == "holds"
             for r in (stats.std_ratio(x, y) for x, y in zip(a, b))]
    assert stats.std_power(n, 0.5, sims=sims, seed=3)["power"] == np.mean(calls) > 0
    assert stats.std_power(5, 0.1, sims=10)["power"] == 0.0


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
    assert stats.fmt_ratio(dict(ratio=0.094, lo=0.04, hi=0.2, p=0.0039)) == \
        "0.09 [0.04, 0.20], p = 0.0039"


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
    (lambda: stats.verdict(0.1, 0.2, 0.01, 10, claim="better"), "claim"),
    (lambda: stats.verdict(0.3, 0.2, 0.01, 10), "lo <= hi"),
    (lambda: stats.verdict(0.1, 0.2, 1.5, 10), "p must be in"),
    (lambda: stats.verdict(0.1, 0.2, 0.01, 1), "n >= 2"),
    (lambda: stats.verdict(0.1, 0.2, 0.01, 10, tests=0), "tests >= 1"),
    (lambda: stats.holm([0.1, float("nan")]), "in \\[0, 1\\]"),
    (lambda: stats.holm([[0.1]]), "1-D"),
    (lambda: stats.std_power(10, 0.0), "ratio > 0"),
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
    assert ("| method | vs | family | paired seeds | Δ mean held-out exact match [95 % CI], p | Holm p | Δ | std "
            "ratio [95 % CI], p | Holm p | std |") in table
    assert re.search(r"\n\| P-POTS\+MIRROR \| Standard \| primary \| 2 \| [+−]\d\.\d{3} \[[+−]\d\."
                     r"\d{3}, [+−]\d\.\d{3}\], p = [\d.]+ \| [\d.]+ \(of \d\) \| untestable at n = 2 \|",
                     table)
    assert ("| ours | vs | iteration | mean held-out exact match up | seed std down | \"the best "
            "baseline run is worse than our worst run\" (min/max, no interval) |") in table
    assert re.search(r"\n\| P-POTS\+MIRROR \| Standard \| 4 \| untestable at n = 2 \| (untestable at "
                     r"n = 2|at ceiling|at floor) \| (holds|does not hold): best Standard \d\.\d{3}, "
                     r"worst P-POTS\+MIRROR \d\.\d{3} \|\n", table)
    assert "no p-value can go below 0.5" in table and "0 FAILED" in table
    assert "| 64 + 17,664 curve (+27,600 %) |" in table  # 4 steps of 8 x 2 rows, and the curve
    summary = json.load(open(study_out / "summary.json"))
    rows = {m: (s["forward_rows"], s["curve_rows"]) for m, s in summary["methods"].items()}
    assert rows == {"Standard": (4 * 16, 0), "P-POTS+MIRROR": (4 * 8 * 2, 69 * 32 * 4 * 2)}
    (c,) = summary["comparisons"]
    assert (c["method"], c["ref"], c["seeds"]) == ("P-POTS+MIRROR", "Standard", [0, 1])
    assert c["diff"]["lo"] <= c["diff"]["diff"] <= c["diff"]["hi"] and 0 < c["diff"]["p"] <= 1
    recs = run_records(study_out)
    assert sorted((r["method"], r["seed"]) for r in recs) == sorted((m, s) for m in STUDY_METHODS
                                                                    for s in (0, 1))
    assert all(r["status"] == "ok" and r["iter"] == 4 and r["loss_A"] is not None
               and r["problems"] == 32 for r in recs)

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
    assert "| Broken | Standard | exploratory | 0 | — (< 2 paired seeds) | — | — |" in table
    assert "- Broken seed 0: train.py exited with status 1: --init_from must be" in table
    failed = [r for r in run_records(out) if r["status"] == "failed"]
    assert len(failed) == 2 and all("bogus" in r["reason"] and "acc" not in r for r in failed)
    assert reproduce.main(study_args(out, methods=["Standard", "Broken"])) == 2  # retried, not cached
    assert "2 cached" in capsys.readouterr().out


def test_final_result_rejects_non_finite_values_and_a_missing_final_evaluation(tmp_path):
    def result(*log):
        (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        return record.final_result(tmp_path, 0, 4)
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
    res = record.final_result(tmp_path, 0, 4)
    assert (res["acc"], res["clip_frac"], res["epochs"]) == (0.5, 0.25, 3.0)
    assert res["curve"] == [[0, 0.0], [2, 0.25], [4, 0.5]]
    assert (res["problems"], res["curve_problems"]) == (None, [None, None, None])  # not logged
    (tmp_path / "log.jsonl").write_text(json.dumps({"iter": 4, "val_bits": 1.4, "acc": 0.5,
                                                    "problems": 256}) + "\n")
    res = record.final_result(tmp_path, 0, 4)
    assert (res["clip_frac"], res["epochs"], res["curve"]) == (None, None, [[4, 0.5]])
    assert (res["problems"], res["curve_problems"]) == (256, [256])


def _judged(arms, study_def, problems=1024, **cfg):
    """study.summarise on made-up records: arms = {method: [(mid, final) accuracy per seed, None
    for a failed run]}, evaluated at iterations 5 and 10; a method named in no_problems has
    records cached before 'problems' was recorded."""
    flags = {"P-POTS+MIRROR": ["--t_sampler=ppots", "--masking=mirror"]}
    old = cfg.pop("no_problems", ())
    jobs = [dict(method=m, seed=s, conf=study.run_config(flags.get(m, [])), record=dict(
        status="failed", seed=s, reason="exit 1") if acc is None else dict(
        status="ok", seed=s, iter=10, acc=acc[1], val_bits=1.0, seconds=1.0,
        curve=[[5, acc[0]], [10, acc[1]]],
        **({} if m in old else dict(problems=problems, curve_problems=[problems] * 2))))
        for m, accs in arms.items() for s, acc in enumerate(accs)]
    cfg = dict(methods=list(arms), seeds=len(arms["Standard"]), max_iters=10, task_args="",
               train_args="", **cfg)
    return study.summarise(study_def, cfg, jobs)


def test_claims_follow_the_interval_and_holm_over_the_seeds_where_both_runs_succeeded(tmp_path):
    """10 seeds at two points (iterations 5 and 10). Primary family: the three pairs of
    reproduce.py x 2 points x both claims, less the std claims at a bound: 10 tests. P-POTS+MIRROR
    (seed 3 failed) is higher with 0.1 x the spread at every seed: p = 2/2^9 for both claims,
    Holm-adjusted well below 0.05; P-POTS+MIRROR-paper is lower at every seed; Standard-2x scores
    1.000 everywhere: its std is 0, so every std ratio with it is 'at ceiling', untested."""
    base = [0.30, 0.50, 0.40, 0.60, 0.45, 0.55, 0.35, 0.52, 0.48, 0.42]
    noise = [0.02, -0.03, 0.01, 0.04, -0.02, 0.0, 0.03, -0.01, -0.04, 0.02]
    ours = lambda b: 0.8 + 0.1 * (b - 0.45)
    arms = {"Standard": [(b - 0.1, b) for b in base],
            "Standard-2x": [(1.0, 1.0)] * 10,
            "P-POTS+MIRROR": [None if s == 3 else (ours(b) - 0.1, ours(b))
                              for s, b in enumerate(base)],
            "P-POTS+MIRROR-paper": [(b - 0.3 + e, b - 0.25 + e) for b, e in zip(base, noise)]}
    scratch = dataclasses.replace(reproduce.SCRATCH, points=(0.5, 1.0))
    summary = _judged(arms, scratch, no_problems=("Standard-2x",))
    assert summary["iters"] == [5, 10]
    comps = {(c["method"], c["ref"], c["iter"]): c for c in summary["comparisons"]}
    assert len(comps) == len(summary["comparisons"]) == 8
    pm = comps["P-POTS+MIRROR", "Standard", 10]
    assert pm["seeds"] == [0, 1, 2, 4, 5, 6, 7, 8, 9] and pm["family"] == "primary"
    assert pm["diff"]["diff"] == pytest.approx(np.mean([ours(b) - b for s, b in enumerate(base)
                                                         if s != 3]))
    assert pm["std_ratio"]["ratio"] == pytest.approx(0.1)
    assert pm["diff"]["p"] == pm["std_ratio"]["p"] == 2 / 2 ** 9
    primary = [t for c in summary["comparisons"] if c["family"] == "primary"
               for t in (c["diff"], c["std_ratio"]) if t]
    assert len(primary) == 10 and {t["holm_m"] for t in primary} == {10}
    assert stats.holm([t["p"] for t in primary]) == [t["p_holm"] for t in primary]
    assert (pm["diff_verdict"], pm["std_verdict"]) == ("higher", "lower")
    assert pm["claims"] == dict(better="holds", std_down="holds", best_ref=0.6,
                                worst_ours=pytest.approx(0.785), worst_beats_best=True)
    assert comps["P-POTS+MIRROR", "Standard", 5]["claims"]["best_ref"] == pytest.approx(0.5)
    paper = comps["P-POTS+MIRROR-paper", "Standard", 10]
    assert paper["claims"]["better"] == "contradicted" and paper["diff_verdict"] == "lower"
    assert paper["claims"]["std_down"] == "not detectable"
    control = comps["P-POTS+MIRROR-paper", "Standard-2x", 10]
    assert (control["std_bound"], control["std_ratio"], control["claims"]["std_down"]) == (
        "at ceiling", None, "at ceiling")
    explore = comps["Standard-2x", "Standard", 10]
    assert explore["family"] == "exploratory" and "claims" not in explore
    assert explore["diff"]["holm_m"] == 2 and explore["diff"]["p_holm"] == 2 * explore["diff"]["p"]
    assert (explore["diff_verdict"], explore["std_verdict"]) == ("higher", "at ceiling")
    methods = summary["methods"]
    assert methods["P-POTS+MIRROR"]["failed"] == [dict(seed=3, reason="exit 1")]
    assert methods["Standard"]["eval_se"] == pytest.approx(math.sqrt(0.457 * 0.543 / 1024))
    assert methods["Standard-2x"]["eval_se"] is None  # cached before 'problems' was recorded
    assert methods["Standard"]["points"]["5"]["mean"] == pytest.approx(0.357)
    assert summary["std_power"]["n"] == 10 and set(summary["std_power"]["ratios"]) == {"0.5", "0.7"}

    write_table(scratch, summary, tmp_path / "table.md")
    table = (tmp_path / "table.md").read_text()
    assert "| P-POTS+MIRROR | 9 + 1 FAILED | 0.799 ± 0.008 | 0.013 | " in table
    assert "0.795 FAILED 0.800" in table
    assert "| Standard-2x | 10 | 1.000 ± 0.000 | — | " in table
    assert "| 128,000 + 17,664 curve (+14 %) |" in table  # train.py's defaults: 1000 x 64 x 2
    assert "## Held-out exact match at iteration 5\n" in table
    assert "## Comparisons at iteration 5, paired" in table
    assert "## Comparisons at iteration 10 (the end), paired" in table
    assert re.search(r"\| P-POTS\+MIRROR \| Standard \| primary \| 9 \| \+0\.358 \[.+\], p = 0\.0039 "
                     r"\| 0\.0\d+ \(of 10\) \| higher \| 0\.10 \[0\.10, 0\.10\], p = 0\.0039 \| "
                     r"0\.0\d+ \(of 10\) \| lower \|", table)
    assert "| Standard-2x | Standard | exploratory | 10 | " in table
    assert "| — | — | at ceiling |" in table
    assert "Power of the std test at n = 10 seeds, before Holm" in table
    assert "| P-POTS+MIRROR | Standard | 10 | holds | holds | holds: best Standard 0.600, worst " \
           "P-POTS+MIRROR 0.785 |" in table
    assert "| P-POTS+MIRROR-paper | Standard-2x | 10 | contradicted | at ceiling | " in table
    assert "- P-POTS+MIRROR seed 3: exit 1" in table
    assert "Paired by seed: seed s fixes the init" in table


def test_two_seeds_are_untestable_and_a_zero_std_arm_is_at_ceiling_in_a_study():
    arms = {"Standard": [(0.3, 0.4), (0.5, 0.6)], "P-POTS+MIRROR": [(0.5, 0.9), (0.6, 0.95)],
            "ARM": [(1.0, 1.0), (1.0, 1.0)]}
    summary = _judged(arms, reproduce.SCRATCH)
    pm, arm = summary["comparisons"]
    assert pm["diff"]["lo"] > 0 and pm["claims"]["better"] == "untestable at n = 2"
    assert pm["diff_verdict"] == "untestable at n = 2"
    assert (arm["std_verdict"], arm["std_ratio"]) == ("at ceiling", None)
    assert summary["std_power"]["ratios"]["0.5"]["power"] == 0.0


def test_retable_of_the_documented_study_gives_the_verdicts_docs_results_quotes(tmp_path):
    """docs/results.md's comparisons come from `python -m lab.retable` on its per-seed counts: the
    intervals of the table written under the CI-only rule, and the new verdicts quoted there."""
    with open(os.path.join(HERE, "docs", "results_per_seed.json")) as f:
        _, summary = retable.retable(json.load(f))
    comps = {(c["method"], c["ref"]): c for c in summary["comparisons"]}
    assert stats.fmt_diff(comps["P-POTS+MIRROR", "Standard"]["diff"]) == \
        "\u22120.053 [\u22120.146, +0.035], p = 0.21"
    paper = comps["P-POTS+MIRROR-paper", "Standard"]
    assert paper["claims"]["better"] == "holds" and paper["claims"]["std_down"] == "at ceiling"
    holm = {m: (round(comps[m, "Standard"]["diff"]["p_holm"], 3), comps[m, "Standard"]["diff_verdict"])
            for m in ("pair", "ISAD-hard", "Clipped")}
    assert holm == {"pair": (0.088, "not detectable"), "ISAD-hard": (0.059, "not detectable"),
                    "Clipped": (0.043, "higher")}
    assert [c["family"] for c in summary["comparisons"]].count("primary") == 3
    with pytest.raises(ValueError, match="needs the keys"):
        retable.retable(dict(study="scratch", correct={}))
    with pytest.raises(ValueError, match="one count in"):
        retable.retable(dict(study="scratch", args=[], problems=8, correct=dict(Standard=[9, 1])))


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
    rows = {j["method"]: record.forward_rows(j["conf"], scratch.curve_rows)
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
    args = [f"--out={tmp_path}", "--methods=all", "--seeds=1", "--max_iters=4", "--jobs=2",
            "--threads=1",
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
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert list(curves["arms"]) == list(reproduce_sft.CURVES) and "ARM" in curves["note"]
    assert all(c["iters"] == [0, 2, 4] for c in curves["arms"].values())  # step 0 from report()


def test_sft_defaults_are_the_5_epoch_study(tmp_path, monkeypatch):
    """The default arms, 313 steps of 32 rows (5.0 epochs of 2,000), evaluated on the same 1,024
    problems at 1/4, 1/2, 3/4 and the end (79, 158, 237, 313); --methods=all stands for every row
    of METHODS."""
    cfg = study.parse(reproduce_sft.SFT, [f"--out={tmp_path}"])
    jobs = study.plan(reproduce_sft.SFT, cfg)
    assert cfg["methods"] == list(reproduce_sft.ARMS) and "ARM" not in cfg["methods"]
    conf = next(j["conf"] for j in jobs if j["method"] == "Standard")
    assert conf["max_iters"] * conf["batch_size"] / conf["train_size"] == pytest.approx(5.0, abs=0.01)
    assert conf["eval_problems"] == conf["eval_problems_mid"] == 1024 and not conf["eval_at_start"]
    evals = [i for i in range(1, conf["max_iters"]) if i % conf["eval_interval"] == 0] + [conf["max_iters"]]
    assert evals == [79, 158, 237, 313] and reproduce_sft.SFT.points == (0.5, 1.0)
    assert conf["lr_schedule"] == "linear" and conf["min_lr"] == 0 and conf["ppots_fit_iter"] == 0
    seen = []
    monkeypatch.setattr(study, "main", lambda s, argv: seen.append(argv) or 0)
    reproduce_sft.main(["--methods=all", "--seeds=3"])
    assert seen == [[f"--methods={','.join(reproduce_sft.METHODS)}", "--seeds=3"]]


def test_sft_curves_figure_writes_a_png(tmp_path):
    arms = {arm: dict(iters=[0, 79, 158], rows=[0, 2528, 5056], seeds=10, mean=[0.04, 0.2 + i / 50, 0.3],
                      std=[0.0, 0.02, 0.03]) for i, arm in enumerate(reproduce_sft.CURVES)}
    plots.plot_curves(dict(arms=arms, note="the pretrained ARM, before SFT: 1.000"), tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_sft_pretraining_is_reused_only_under_the_same_flags(tmp_path, monkeypatch):
    cfg = study.parse(reproduce_sft.SFT, [f"--out={tmp_path}"])
    for kind in ("mdm", "arm"):
        os.makedirs(tmp_path / "pretrain" / kind)
        json.dump(reproduce_sft.pretrain_flags(cfg, kind), open(tmp_path / "pretrain" / kind / "flags.json", "w"))
    monkeypatch.setattr(reproduce_sft.subprocess, "Popen", lambda *a, **k: pytest.fail("pretrained again"))
    reproduce_sft.prepare(cfg, [])  # both cached: nothing runs
    with pytest.raises(ValueError, match="pretrained with other flags: use a fresh --out"):
        reproduce_sft.prepare(dict(cfg, pretrain_args=cfg["pretrain_args"] + " --max_iters=7"), [])


# ----------------------------------------------------------------------------- lab.reproduce_text: the text study
@pytest.mark.e2e
def test_tiny_text_study_writes_every_arm_its_variance_fits_and_the_figure(tmp_path, monkeypatch):
    """Every arm, 1 seed, a tiny model on 16-character windows for 6 steps: the table by val ELBO,
    variance.md (end-of-run A, B, C of every MDM arm, every P-POTS fit), curves.json and the
    figure (the per-step loss variance of the primary pairs needs 2 seeds: its own test). P-POTS
    without its EPR fit, fitted at 2 and refitted at 4, and small end-of-run draws keep it short."""
    args = [f"--out={tmp_path}", "--seeds=1", "--max_iters=6", "--jobs=2", "--threads=1",
            "--task_args=--task=text --data_path=data/tinyshakespeare.txt --block_size=16 "
            "--batch_size=8 --n_layer=1 --n_head=2 --n_embd=16 --eval_iters=1 --eval_batch_size=8 "
            "--eval_at_start=False --variance_n_batches=4 --sample_length=0 --log_interval=2",
            "--train_args=--ppots_fit=none --ppots_refit_every=2"]
    monkeypatch.setattr(reproduce_text, "END", dict(n_x0=6, n_t=3, n_masks=2, grad_n_x0=3, n_proj=2))
    assert reproduce_text.main(args) == 0
    table = (tmp_path / "table.md").read_text()
    for arm in reproduce_text.METHODS:
        assert f"| {arm} | 1 | " in table
    assert "| method | runs | val ELBO (nats/token) mean ± std |" in table
    assert "| ours | vs | iteration | mean val ELBO (nats/token) down | seed std down |" in table
    recs = run_records(tmp_path)
    assert len(recs) == 7 and all(r["status"] == "ok" and r["loss_batch_var"] > 0 for r in recs)
    assert all([it for it, _ in r["curve"]] == [2, 4, 6] and r["se"] >= 0 for r in recs)
    assert all((r["se"] == 0) == (r["method"] == "ARM") for r in recs)  # an ARM has no masks
    variance_md = (tmp_path / "variance.md").read_text()
    for arm in reproduce_text.METHODS:
        if arm != "ARM":
            assert f"\n| {arm} | {16 if arm == 'Standard-2x' else 4 if arm in ('MIRROR', 'P-POTS+MIRROR') else 8} | " \
                in variance_md
    fits = variance_md.split("## P-POTS's fits")[1]
    for arm in ("P-POTS", "P-POTS+MIRROR", "P-POTS+MIRROR-paper"):
        assert [int(m) for m in re.findall(rf"\n\| {re.escape(arm)} \| (\d+) \| ", fits)] == [2, 4]
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert list(curves["arms"]) == list(reproduce_text.CURVES)
    assert all(c["iters"] == [2, 4, 6] and c["seeds"] == 1 for c in curves["arms"].values())
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_text_defaults_pin_the_val_rows_and_refit_p_pots_after_the_unigram_stage(tmp_path):
    """7 arms x 8 seeds of 3,000 steps; every arm, Standard-2x's 64 windows included, scores the
    same 100 val batches of 32 windows at 750, 1,500, 2,250 and 3,000; P-POTS fits at 1,000 and
    refits every 500 steps."""
    cfg = study.parse(reproduce_text.TEXT, [f"--out={tmp_path}"])
    jobs = study.plan(reproduce_text.TEXT, cfg)
    assert cfg["methods"] == list(reproduce_text.METHODS) and cfg["seeds"] == 8 and len(jobs) == 56
    confs = {j["method"]: j["conf"] for j in jobs}
    assert confs["Standard-2x"]["batch_size"] == 64 and confs["Standard"]["batch_size"] == 32
    assert {(c["eval_batch_size"], c["eval_iters"], c["task"]) for c in confs.values()} == {(32, 100, "text")}
    conf = confs["P-POTS"]
    evals = [i for i in range(1, conf["max_iters"]) if i % conf["eval_interval"] == 0] + [conf["max_iters"]]
    assert evals == [750, 1500, 2250, 3000] and reproduce_text.TEXT.points == (1.0,)
    fits = range(conf["ppots_fit_iter"], conf["max_iters"], conf["ppots_refit_every"])
    assert list(fits) == [1000, 1500, 2000, 2500]


def _elbo_summary(arms):
    """study.summarise under the val ELBO on made-up records: arms = {method: [(mid, final) val
    ELBO per seed]}, each run with a masking error of 0.01 (0.02 for P-POTS+MIRROR)."""
    flags = {"P-POTS+MIRROR": ["--t_sampler=ppots", "--masking=mirror"]}
    se = lambda m: 0.02 if m == "P-POTS+MIRROR" else 0.01
    jobs = [dict(method=m, seed=s, conf=study.run_config(flags.get(m, [])), record=dict(
        status="ok", seed=s, iter=10, val_nats=v[1], se=se(m), val_bits=v[1] / math.log(2),
        seconds=1.0, curve=[[5, v[0]], [10, v[1]]], curve_se=[se(m)] * 2))
        for m, vals in arms.items() for s, v in enumerate(vals)]
    cfg = dict(methods=list(arms), seeds=len(arms["Standard"]), max_iters=10, task_args="",
               train_args="")
    text = dataclasses.replace(reproduce_text.TEXT, primary=(("P-POTS+MIRROR", "Standard"),),
                               points=(0.5, 1.0))
    return text, study.summarise(text, cfg, jobs)


def test_a_lower_val_elbo_is_the_better_claim_and_its_eval_se_is_the_runs_rms(tmp_path):
    """Under VAL_ELBO lower is better: an arm 0.05 nats below Standard at each of 10 seeds makes
    the claim 'holds' while its difference reads 'lower'; the best baseline run is the lowest, our
    worst the highest; the eval SE is the runs' root mean square error; no cell is at a bound."""
    base = [2.70, 2.72, 2.68, 2.75, 2.71, 2.69, 2.73, 2.74, 2.66, 2.70]
    arms = {"Standard": [(b + 0.2, b) for b in base],
            "P-POTS+MIRROR": [(b + 0.1, b - 0.05 + 0.001 * s) for s, b in enumerate(base)]}
    text, summary = _elbo_summary(arms)
    c = next(c for c in summary["comparisons"] if c["iter"] == 10)
    assert c["diff_verdict"] == "lower" and c["claims"]["better"] == "holds"
    assert c["claims"]["best_ref"] == 2.66 and c["claims"]["worst_ours"] == pytest.approx(2.75 - 0.05 + 0.003)
    assert c["claims"]["worst_beats_best"] is False and c["std_bound"] is None
    assert summary["methods"]["P-POTS+MIRROR"]["eval_se"] == pytest.approx(0.02)
    assert summary["metric"]["key"] == "val_nats" and summary["metric"]["lower_is_better"]
    write_table(text, summary, tmp_path / "table.md")
    table = (tmp_path / "table.md").read_text()
    assert "| Standard | 10 | 2.7080 ± 0.0278 | 0.0100 | 2.6600 | 2.7500 |" in table
    assert "## Val ELBO (nats/token) at iteration 5\n" in table
    assert "| P-POTS+MIRROR | Standard | 10 | holds | " in table
    plots.plot_results(summary, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_the_per_step_loss_variance_of_the_primary_pairs_is_paired_by_seed_and_holm_corrected():
    """batch_variance on made-up records of 10 seeds: P-POTS's logged batch_var is half of
    Standard's at every seed (times a shared per-seed factor), so the ratio is 0.5 with p = 2/2^10
    (Holm x 3 still below 0.05): 'holds'; P-POTS+MIRROR's equals Standard's: 'not detectable';
    P-POTS+MIRROR-paper has one seed beside Standard-2x: no row."""
    rng = np.random.default_rng(0)
    base = np.exp(rng.normal(size=10))
    var = {"Standard": base, "P-POTS": 0.5 * base * np.exp(rng.normal(0, 0.01, 10)),
           "P-POTS+MIRROR": base * np.exp(rng.normal(0, 0.3, 10)), "Standard-2x": base[:1],
           "P-POTS+MIRROR-paper": base[:1]}
    jobs = [dict(method=m, seed=s, record=dict(status="ok", loss_batch_var=float(v)))
            for m, vs in var.items() for s, v in enumerate(vs)]
    lines = reproduce_text.batch_variance(jobs)
    rows = {tuple(ln.split(" | ")[:2]): ln for ln in lines if ln.startswith("| P-POTS")}
    assert set(rows) == {("| P-POTS", "Standard"), ("| P-POTS+MIRROR", "Standard")}
    ratio, lo, hi = map(float, re.search(r"\| 10 \| ([\d.]+) \[([\d.]+), ([\d.]+)\] \| 0\.002 \| 0\.0039 \| "
                                         r"holds \|$", rows["| P-POTS", "Standard"]).groups())
    assert lo < ratio < hi and abs(ratio - 0.5) < 0.01 and hi - lo < 0.02
    assert rows["| P-POTS+MIRROR", "Standard"].endswith("| not detectable |")
    assert "Holm p (of 2)" in lines[0]
