"""The reference's tests (the modules and scripts at the repository root); lab/test_lab.py tests the
lab. Both run as the README says: python -m pytest -q test_all.py lab (-m "not e2e" skips the tests
marked e2e, which run a script end to end, for a fast subset). Nothing here imports or runs the lab:
this file passes without lab/.

What it checks, section by section:
- masking and loss: the loss is unbiased for the ELBO term; marginal mask rates are p and the
  prompt is never masked; rows with nothing masked count as 0; MIRROR's joint rate is
  max(0, 2p - 1) and pair's p^2; with fixed logits the variance of (l1 + l2)/2 follows the
  covariance law (mirror < pair).
- data and generation: held-out problems never appear in training; generation fills every mask
  and keeps the prompt; an ARM decodes left to right.
- training end to end: tiny MDM, ARM, P-POTS + MIRROR and text runs lower the val ELBO and write
  their outputs; resume is bit-exact (also with every supplementary method on); eval_batch_size
  pins the val ELBO's rows whatever the batch; the val ELBO's masking error covers its spread.
- bad input: one `error:` line and no traceback from train.py and sample.py; a table of ~40 bad
  train.py flags (and sample.py's), each refused before out_dir changes (byte for byte); config
  files with syntax errors; out_dir a file or empty; a checkpoint without its config; a missing
  GPU named as such; a NaN step stops the run and keeps the checkpoint; a full disk keeps the
  previous checkpoint; a second run in a live out_dir stops; resume applies changeable flags and
  logs each iteration once.
- samplers.py: every unbiased t-law integrates t, t^2 and e^t; StraTS's counts; P-POTS draws
  follow p with w = 1/p(t); the EPR fit recovers known parameters; p ∝ √m is optimal; the 1/p
  tail below the grid matches closed forms; grid support never leaves the grid and estimates the
  truncated integral; state dicts round-trip (online bins too); the core never uses what is
  behind samplers.py's seam.
- variance.py: decompose is unbiased where the naive plug-in is not; StraTS is decomposed with
  marginal draws (one stratified call per x0 is biased); an ARM has A = B = 0 exactly; measure
  keeps the draws behind its components, on the x0s a curve with the same seed sees; gradient
  projections match autograd.
- ISAD, SyRM, EMA control variate, weight EMA: rates, means, the ISAD gap when token losses read
  the context, alpha = 1 is the standard loss, the control variate leaves the gradient
  bit-identical.
- data.py, text.py and sample.py: the shipped corpus, a text checkpoint's stored vocabulary,
  temperature sampling, the largest correct num_digits, prompt layouts, generate()'s arguments.
- the SFT regime: twosort and mix rows are correct; a finite set gives every example once per
  epoch, the same set for every seed, never a held-out problem; fine-tuning starts from the
  checkpoint's weights in its shape, refuses another vocabulary or shape, and resumes bit-exactly.
- scale: sliced masks equal one call; float32 loss under bfloat16; compile vs eager (skipped
  without a C++ compiler); 2 processes under torchrun train like 1.
Statistical checks use fixed seeds and tolerances derived from the Monte Carlo standard error."""
import ast
import hashlib
import io
import json
import math
import os
import random
import re
import runpy
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import finetune
import step as step_module
import train_config
import sample
import variance
import checkpoint
from checkpoint import load_checkpoint
from control_variate import LossControlVariate
from data import AddTask, SortTask, _in_val, get_task
from figures import plot_ppots, plot_variance
from masking import (EPS, MaskSpec, SupplementarySpec, arm_loss, draw_masks, isad_rates, mask_rate, mask_spec_from_config,
                     mdm_loss, mirror_masks, pair_masks, random_mask, row_losses, syrm_loss)
from model import ModelConfig, Transformer, WeightEMA
from sample import generate, text_sample
from samplers import (CELLS, PPOTS, OnlinePPOTS, build_ppots, curve_integrals, describe_fit,
                      epr_log_density, extended_sqrt_m, fit_epr, log_normalise, make_sampler, measure_curve,
                      restore_sampler, sampler_from_state, second_moments, tail_coefficients)
from text import TextTask
from variance import decompose, draw_rates, format_line, measure, naive_decompose

# torch's forward-mode AD (variance.py, target='grad') loads jit-scripted decompositions on first use
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=32", "--num_digits=4",
        "--eval_problems=32", "--eval_iters=1", "--variance_interval=0", "--warmup_iters=5"]


def run(script, *args, check=True, threads=None):
    """Run one of the repo's scripts as a user would, from the repository root: a file as
    `python train.py args`, a module as `python -m lab.bench args`; return the CompletedProcess.
    threads: its torch threads (OMP_NUM_THREADS), else the default."""
    command = [os.path.join(HERE, script)] if script.endswith(".py") else ["-m", script]
    env = dict(os.environ, **({} if threads is None else {"OMP_NUM_THREADS": str(threads)}))
    proc = subprocess.run([sys.executable, *command, *args], capture_output=True,
                          text=True, cwd=HERE, timeout=300, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read_log(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]


def fixed_problem(seed=0, B=6, T=7, V=5):
    """Fixed logits (a frozen 'model'), clean tokens, and eligible positions with a 2-token prompt."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g)
    x0 = torch.randint(0, V, (B, T), generator=g)
    eligible = torch.ones(B, T, dtype=torch.bool)
    eligible[:, :2] = False
    return logits, x0, eligible


# ----------------------------------------------------------------------------- masking and loss
def test_mdm_loss_is_unbiased_for_the_elbo_term():
    """E_mask[l] = (1/P) sum_{eligible} CE_i, per row, for rates from tiny to 1."""
    logits, x0, eligible = fixed_problem()
    p = mask_rate(torch.tensor([0.0, 0.05, 0.3, 0.5, 0.9, 1.0]))
    ce = F.cross_entropy(logits.transpose(1, 2), x0, reduction="none")
    exact = (ce * eligible).sum(1) / eligible.sum(1)
    g, N = torch.Generator().manual_seed(1), 40000
    rep = lambda z: z.repeat(N, *[1] * (z.dim() - 1))  # N mask draws per row, in one batch
    L = mdm_loss(rep(logits), rep(x0), random_mask(rep(eligible), rep(p), g), rep(eligible), rep(p)).view(N, -1)
    se = L.std(0) / math.sqrt(N)
    assert ((L.mean(0) - exact).abs() <= 4 * se + 1e-6).all(), (L.mean(0), exact, se)


def test_marginal_mask_rate_is_p_and_prompt_never_masked():
    _, x0, eligible = fixed_problem(B=4, T=50)
    p = torch.tensor([0.001, 0.2, 0.5, 0.95])
    g, N = torch.Generator().manual_seed(2), 4000
    counts = random_mask(eligible.repeat(N, 1), p.repeat(N), g).view(N, 4, -1).double().sum(0)
    assert counts[:, :2].sum() == 0  # the prompt
    rate = counts[:, 2:].mean(1) / N
    se = (p * (1 - p) / (N * eligible[:, 2:].sum(1))).sqrt()
    assert ((rate - p).abs() <= 4 * se).all(), (rate, p)


def test_rows_with_nothing_masked_count_as_zero():
    logits, x0, eligible = fixed_problem()
    mask = torch.zeros_like(eligible)
    mask[0, 3] = True
    loss = mdm_loss(logits, x0, mask, eligible, torch.full((6,), 0.5))
    assert loss.shape == (6,) and (loss[1:] == 0).all() and loss[0] > 0
    # a non-eligible token is never masked, even at p = 1
    assert not random_mask(eligible, torch.ones(6))[:, :2].any()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.7, 0.95])
def test_mirror_and_pair_masks_have_the_right_marginal_and_joint_rates(p):
    _, x0, eligible = fixed_problem(B=1, T=40)
    N = 5000
    el = eligible.repeat(N, 1)
    n = N * eligible.sum().item()
    for masks, joint in ((mirror_masks, max(0.0, 2 * p - 1)), (pair_masks, p * p)):
        m1, m2 = masks(el, torch.full((N,), p), torch.Generator().manual_seed(3))
        assert not (m1 | m2)[:, :2].any()  # the prompt
        for rate, truth in ((m1.sum() / n, p), (m2.sum() / n, p), ((m1 & m2).sum() / n, joint)):
            assert abs(rate.item() - truth) <= 4 * math.sqrt(truth * (1 - truth) / n) + 1e-12, (masks, rate, truth)
        if masks is mirror_masks and p <= 0.5:
            assert not (m1 & m2).any()  # disjoint views
    again = mirror_masks(el, torch.full((N,), p), torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(again, mirror_masks(el, torch.full((N,), p),
                                                                       torch.Generator().manual_seed(3))))


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_mirror_follows_the_covariance_law_and_beats_pair_with_fixed_logits(p):
    """Fixed logits: l is linear in the mask indicators, so Var((l1+l2)/2) has a closed form,
    sum_i (CE_i / (p P))^2 * (p(1-p) + c) / 2 with per-token covariance c = 0 (pair) or
    -min(p, 1-p)^2 (MIRROR). The Monte Carlo variances must match it within 4 SE."""
    logits, x0, eligible = fixed_problem(B=1, T=12)
    ce = F.cross_entropy(logits.transpose(1, 2), x0, reduction="none")[0]
    P, N = eligible.sum().item(), 200000
    rep = lambda z: z.repeat(N, *[1] * (z.dim() - 1))
    pv = torch.full((N,), p)
    for masks, cov in ((pair_masks, 0.0), (mirror_masks, -min(p, 1 - p) ** 2)):
        m1, m2 = masks(rep(eligible), pv, torch.Generator().manual_seed(4))
        l = (mdm_loss(rep(logits), rep(x0), m1, rep(eligible), pv) + mdm_loss(rep(logits), rep(x0), m2, rep(eligible), pv)) / 2
        exact = ((ce[eligible[0]] / (p * P)) ** 2).sum().item() * (p * (1 - p) + cov) / 2
        centred = (l - l.mean()).double()
        se = math.sqrt(((centred ** 4).mean() - centred.var() ** 2).item() / N)
        rounding = 1e-10 * l.mean().item() ** 2  # at p = 1/2 MIRROR's views are complements: Var = 0 up to float32
        assert abs(centred.var().item() - exact) <= 4 * se + rounding, (masks, centred.var().item(), exact, se)
        if masks is pair_masks:
            pair_var = exact
    assert exact < pair_var


# ----------------------------------------------------------------------------- data
def test_held_out_problems_never_appear_in_training():
    for name, kw in (("sort", dict(num_digits=4)), ("add", dict(num_digits=2))):
        task = get_task(name, **kw)
        g = torch.Generator().manual_seed(0)
        train = {tuple(r) for r in task.batch(20000, "train", g)[0].tolist()}
        val = {tuple(r) for r in task.batch(2000, "val", g)[0].tolist()}
        assert train and val and not train & val
        x0, eligible = task.batch(8, "val", g)
        assert task.is_correct(x0[:, :task.prompt_len], x0[:, task.prompt_len:]).all()
        assert not eligible[:, :task.prompt_len].any() and eligible[:, task.prompt_len:].all()


# ----------------------------------------------------------------------------- generation
@pytest.mark.parametrize("kw", [dict(), dict(steps=2, remasking="random"), dict(block_length=3, steps=4),
                                dict(temperature=1.0, steps=3)])
def test_generation_fills_every_mask_and_keeps_the_prompt(kw):
    task = get_task("sort", num_digits=8)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=1, n_embd=32, n_head=2)).eval()
    prompt = task.prompts(5, "val", generator=torch.Generator().manual_seed(0))
    x = generate(model, prompt, task.response_len, generator=torch.Generator().manual_seed(0), **kw)
    assert x.shape == (5, task.seq_len)
    assert torch.equal(x[:, :task.prompt_len], prompt)
    assert not (x == task.mask_id).any()


def test_generation_with_a_causal_model_decodes_left_to_right():
    task = get_task("sort", num_digits=4)
    model = Transformer(ModelConfig(n_layer=1, n_embd=32, n_head=2, block_size=9, causal=True)).eval()
    prompt = task.prompts(3, "val")
    x = generate(model, prompt, task.response_len)
    assert torch.equal(x[:, :task.prompt_len], prompt) and not (x == task.mask_id).any()


# ----------------------------------------------------------------------------- training end to end
@pytest.mark.parametrize("model_type", ["mdm", "arm"])
@pytest.mark.e2e
def test_short_training_lowers_val_elbo_and_writes_outputs(tmp_path, model_type):
    out = str(tmp_path)
    proc = run("train.py", f"--out_dir={out}", "--max_iters=60", "--eval_interval=60", f"--model_type={model_type}", *TINY)
    val = [r["val_bits"] for r in read_log(out) if "val_bits" in r]
    assert val[-1] < 0.8 * val[0], val
    assert "held-out exact match" in proc.stdout.strip().splitlines()[-1]
    for name in ("ckpt.pt", "train.png"):
        assert os.path.exists(os.path.join(out, name))
    sampled = run("sample.py", f"--out_dir={out}", "--num_samples=3")
    assert "held-out exact match" in sampled.stdout


@pytest.mark.e2e
def test_ppots_mirror_training_logs_variance_and_writes_plots(tmp_path):
    out = str(tmp_path)
    proc = run("train.py", f"--out_dir={out}", "--max_iters=20", "--eval_interval=20", "--t_sampler=ppots",
               "--masking=mirror", "--ppots_fit_iter=10", "--ppots_online=True", "--ppots_refit_every=5",
               *TINY[:-2], "--variance_interval=10", "--warmup_iters=5")
    fits = [ln.split(":")[0] for ln in proc.stdout.splitlines() if "P-POTS ppots fit=epr" in ln]
    assert fits == ["iter 10", "iter 15"]  # measured at 10, refitted online from the binned training losses at 15
    lines = [ln for ln in proc.stdout.splitlines() if " | loss A " in ln and " | grad A " in ln]
    assert [ln.split(" |")[0] for ln in lines] == ["iter 0", "iter 10", "iter 20"]
    assert len([r for r in read_log(out) if "variance" in r]) == 3
    train_records = [r for r in read_log(out) if "w_mean" in r]
    assert all(sum(r["t_hist"]) == 16 * 10 for r in train_records)  # matched compute: 32 rows = 16 x0 x 2 views
    for name in ("ppots.png", "variance.png", "train.png"):
        assert os.path.exists(os.path.join(out, name))


def test_val_elbo_error_matches_its_spread_over_mask_draws():
    """val_elbo's masking error against the spread of K estimates of one model on the same val
    rows with other masks. SE^2 is unbiased, so the spread's std is compared with the root of
    the mean SE^2; the 1/p weights make the losses heavy-tailed, so the ratio's Monte Carlo
    error comes from a bootstrap over the K calls, and it is small enough that an SE off by
    sqrt(2) would fail. The default call (no mask_seed) is the training run's number, and an
    ARM has no masking error."""
    torch.manual_seed(0)
    model, task = Transformer(ModelConfig(block_size=9, n_layer=1, n_head=2, n_embd=16)), get_task("sort", num_digits=4)
    ctx, K = torch.no_grad(), 300
    runs = np.array([sample.val_elbo(model, task, 64, 2, "cpu", ctx, mask_seed=10 + 2 * k) for k in range(K)])
    ratio = lambda r: r[:, 0].std(ddof=1) / np.sqrt((r[:, 1] ** 2).mean())
    rng = np.random.default_rng(0)
    mc = np.std([ratio(runs[rng.integers(0, K, K)]) for _ in range(1000)])
    assert abs(ratio(runs) - 1) < 3 * mc < 1 - 1 / math.sqrt(2), (ratio(runs), mc)
    assert sample.val_elbo(model, task, 16, 2, "cpu", ctx) == sample.val_elbo(model, task, 16, 2, "cpu", ctx)
    arm = Transformer(ModelConfig(block_size=9, n_layer=1, n_head=2, n_embd=16, causal=True))
    assert sample.val_elbo(arm, task, 16, 2, "cpu", ctx)[1] == 0.0


@pytest.mark.e2e
def test_eval_batch_size_pins_the_val_rows_whatever_the_batch(tmp_path):
    """Two runs of the same seed (the same init), one with twice the batch: at iteration 0 their
    val ELBOs differ unless eval_batch_size pins the val rows, and then they are equal."""
    def elbo(name, *flags):
        run("train.py", f"--out_dir={tmp_path / name}", "--max_iters=0", *TINY, *flags)
        return read_log(tmp_path / name)[0]["val_nats"]
    base = elbo("a", "--batch_size=16")
    assert elbo("b", "--batch_size=32", "--eval_batch_size=16") == base != elbo("c", "--batch_size=32")


@pytest.mark.e2e
def test_resume_reproduces_the_uninterrupted_losses_bit_exactly(tmp_path):
    common = ["--log_interval=1", "--eval_interval=10", "--lr_decay_iters=20", "--t_sampler=stratified", *TINY]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run("train.py", f"--out_dir={full}", "--max_iters=20", *common)
    run("train.py", f"--out_dir={part}", "--max_iters=10", *common)
    run("train.py", f"--out_dir={part}", "--max_iters=20", "--init_from=resume")
    losses = lambda d: [(r["iter"], r["loss"]) for r in read_log(d) if "loss" in r]
    assert losses(part) == losses(full) and len(losses(full)) == 20


@pytest.mark.e2e
def test_text_training_reports_nats_and_samples_and_rejects_unknown_prompt_chars(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n" * 60)
    out = str(tmp_path / "out")
    proc = run("train.py", "--task=text", f"--data_path={text}", "--block_size=32", f"--out_dir={out}",
               "--max_iters=20", "--eval_interval=20", "--sample_length=24", "--sample_prompt=the",
               "--t_sampler=ppots", "--ppots_fit_iter=5", "--ppots_refit_every=5", *TINY)
    assert "--- sample after 'the'" in proc.stdout and "nats/token" in proc.stdout.splitlines()[-1]
    evals = [r for r in read_log(out) if "val_nats" in r]
    assert evals[-1]["val_nats"] < evals[0]["val_nats"] and evals[-1]["val_se_nats"] > 0
    assert math.isclose(evals[-1]["val_bits"], evals[-1]["val_nats"] / math.log(2))
    # P-POTS refitted on its schedule: each fit is a log record, and each changed the law
    fits = [r for r in read_log(out) if "ppots" in r]
    assert [r["iter"] for r in fits] == [5, 10, 15] and all(r["ppots"]["ratio"] > 0 for r in fits)
    assert all(a["ppots"]["params"] != b["ppots"]["params"] for a, b in zip(fits, fits[1:]))
    saved = sampler_from_state(load_checkpoint(os.path.join(out, "ckpt.pt"))[1]["sampler"])
    assert saved.params == fits[-1]["ppots"]["params"]
    assert len(run("sample.py", f"--out_dir={out}", "--prompt=lazy", "--length=8", "--num_samples=1").stdout) > 8
    _one_error_line(run("sample.py", f"--out_dir={out}", "--prompt=QZ!", check=False), "not in the vocabulary")


# ----------------------------------------------------------------------------- bad input
def _one_error_line(proc, *words, during_training=False):
    """Exit status 1, no traceback, and one `error:` line naming `words`: all of stderr, or for an
    error during training its last line, after the closed progress bar."""
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert (during_training or len(lines) == 1) and lines[-1].startswith("error:"), proc.stderr[-2000:]
    assert all(w in lines[-1] for w in words), lines[-1]


@pytest.mark.e2e
def test_bad_input_gives_one_clear_error_line(tmp_path):
    """Each script turns its ValueError into one `error:` line and a non-zero exit (the in-process
    tables below rely on it); the other cases here raise that ValueError in-process."""
    _one_error_line(run("train.py", "--no_such_key=1", check=False), "no_such_key")
    out = tmp_path / "corrupt"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"not a checkpoint")
    _one_error_line(run("sample.py", f"--out_dir={out}", check=False), "corrupt")
    (tmp_path / "preset.py").write_text("max_iters = 10\nlearning_rat = 1e-3\n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00caf\xe9" * 100)
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be")
    for args, needle in [(["--max_iters=ten"], "max_iters"),
                         (["--batch_size=30", "--gradient_accumulation_steps=4"], "do not split"),
                         ([str(tmp_path / "preset.py")], "learning_rat"),
                         (["--task=text", f"--data_path={tmp_path / 'missing.txt'}"], "missing.txt"),
                         (["--task=text", f"--data_path={binary}"], "not UTF-8"),
                         (["--task=text", f"--data_path={short}", "--block_size=64"], "too short"),
                         (["--init_from=resume"], "corrupt")]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            run_inproc("train.py", *args, f"--out_dir={out}")
    assert (out / "ckpt.pt").read_bytes() == b"not a checkpoint"  # nothing overwritten


def run_inproc(script, *args):
    """Run a script (train.py, or a module such as lab.bench: its file) in this process, as `python
    script args` would (its error hook aside): the bad input raises the ValueError that the hook
    turns into the one `error:` line (checked above)."""
    argv = sys.argv
    sys.argv = [script, *args]
    path = script if script.endswith(".py") else os.path.join(*script.split(".")) + ".py"
    try:
        runpy.run_path(os.path.join(HERE, path), run_name="__main__")
    finally:
        sys.argv = argv
        sys.excepthook = sys.__excepthook__


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny finished run (10 iterations, checkpoint at 10) whose out_dir bad input must not touch."""
    out = tmp_path_factory.mktemp("finished")
    run("train.py", f"--out_dir={out}", "--max_iters=10", "--eval_interval=10", "--log_interval=1", *TINY)
    return out


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fresh_copy(finished_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    return out


BAD_TRAIN = [  # (flags, words the error line must contain); TINY flags and --out_dir come first
    (["--batch_size=0"], "batch_size"), (["--eval_iters=0"], "eval_iters"), (["--eval_interval=0"], "eval_interval"),
    (["--log_interval=0"], "log_interval"), (["--num_digits=0"], "num_digits"), (["--num_digits=19"], "num_digits"),
    (["--n_head=3"], "n_head"), (["--eval_problems=0"], "eval_problems"), (["--max_iters=-1"], "max_iters"),
    (["--t_sampler=ppots", "--ppots_fit=bogus"], "ppots_fit"), (["--t_sampler=bogus"], "t_sampler"),
    (["--masking=bogus"], "masking"), (["--model_type=gpt"], "model_type"), (["--grad_clip=-1"], "grad_clip"),
    (["--masking=mirror", "--batch_size=31"], "even"), (["--masking=pair", "--batch_size=1"], "even"),
    (["--batch_size=True"], "batch_size"), (["--learning_rate=0"], "learning_rate"),
    (["--min_lr=0.5"], "min_lr"), (["--warmup_iters=-1"], "warmup_iters"), (["--dropout=1.0"], "dropout"),
    (["--gradient_accumulation_steps=0"], "gradient_accumulation_steps"),
    (["--batch_size=32", "--gradient_accumulation_steps=3"], "do not split"),
    (["--device=cuda:0"] if not torch.cuda.is_available() else ["--device=cuda:99"], "GPU"),
    (["--device=tpu"], "device"), (["--dtype=float8"], "dtype"), (["--init_from=bogus"], "'bogus' is none of them"),
    (["--learning_rate=1e999"], "learning_rate=inf is not a finite number"), (["--seed=-5"], "--seed=-5"),
    (["--model_type=arm", "--masking=mirror"], "ARM"), (["--ppots_online=True"], "ppots_online"),
    (["--syrm_alpha=1.5"], "syrm_alpha"), (["--isad_tokens=bogus"], "isad_tokens"),
    (["--isad_tokens=first", "--isad_delta=0"], "isad_delta"), (["--cv_bins=2", "--cv_eta=0"], "cv_eta"),
    (["--weight_ema_decay=1.0"], "weight_ema_decay"), (["--variance_n_masks=1"], "variance_n_masks"),
    (["--task=text"], "data_path"), (["--task=text", "--data_path=data/tinyshakespeare.txt", "--block_size=1"],
                                     "block_size"),
    (["--init_from=resume", "--n_layer=2"], "n_layer"), (["--init_from=resume", "--task=add"], "task"),
    (["--init_from=resume", "--masking=mirror"], "masking"), (["--init_from=resume", "--max_iters=10"], "nothing"),
    (["--init_from=resume", "--max_iters=20", "--t_sampler=stratified"], "t_sampler"),
    (["--init_from=resume", "--max_iters=20", "--data_path=data/tinyshakespeare.txt"], "data_path"),
    (["--train_size=-1"], "train_size"), (["--lr_schedule=step"], "lr_schedule"),
    (["--task=text", "--data_path=data/tinyshakespeare.txt", "--train_size=10"], "finite corpus"),
    (["--init_from={ckpt}", "--task=twosort"], "vocabulary"),
    (["--init_from={ckpt}", "--n_layer=2"], "pretrained shape"),
    (["--init_from={ckpt}", "--num_digits=6"], "at most 9"),
]


@pytest.mark.parametrize("flags, words", BAD_TRAIN, ids=[" ".join(f) for f, _ in BAD_TRAIN])
@pytest.mark.e2e
def test_train_refuses_bad_input_before_touching_out_dir(finished_run, tmp_path, flags, words):
    out = fresh_copy(finished_run, tmp_path)
    before = snapshot(out)
    flags = [f.replace("{ckpt}", str(out / "ckpt.pt")) for f in flags]  # fine-tune this run
    with pytest.raises(ValueError, match=words):
        run_inproc("train.py", *TINY, f"--out_dir={out}", *flags)
    assert snapshot(out) == before


@pytest.mark.e2e
def test_bad_out_dirs_and_config_files_are_one_clear_error(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    broken = tmp_path / "broken.py"
    broken.write_text("max_iters = (\n")
    for args, words in (([f"--out_dir={a_file}"], "is a file"), ([f"--out_dir={a_file}/sub"], "cannot write"),
                        (["--out_dir="], "empty"), ([str(broken)], "line")):
        with pytest.raises(ValueError, match=words):
            run_inproc("train.py", *TINY, "--max_iters=0", *args)
    assert a_file.read_text() == "keep me"
    _one_error_line(run("train.py", str(broken), check=False), "broken.py", "line 1")


BAD_CKPT = [  # (how a checkpoint is broken, the words its error names, only resume reads it)
    (lambda c: c.pop("config"), "its 'config' is missing", False),
    (lambda c: c.update(config="abc"), "its 'config' is str", False),
    (lambda c: c.update(config={}), "a config without model_type", False),
    (lambda c: c["config"].update(batch_size=0), "config that train.py refuses: --batch_size=0", False),
    (lambda c: c["model_args"].update(n_head=0), "model shape that does not build", False),
    (lambda c: c["model"]["lm_head.weight"].fill_(math.nan), "non-finite model weights", False),
    (lambda c: c.update(iter_num="x"), "its 'iter_num' is str", True),
    (lambda c: c.pop("optimizer"), "its 'optimizer' is missing", True),
    (lambda c: c.pop("rng"), "its 'rng' is missing", True),
]


@pytest.mark.e2e
@pytest.mark.parametrize("breaks, words, resume_only", BAD_CKPT, ids=[w for _, w, _ in BAD_CKPT])
def test_a_broken_checkpoint_is_refused_on_load_naming_the_file(finished_run, tmp_path, breaks, words, resume_only):
    """checkpoint.load_checkpoint checks once for every reader: resume, --init_from=PATH, sample.py."""
    out = fresh_copy(finished_run, tmp_path)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    breaks(ckpt)
    torch.save(ckpt, out / "ckpt.pt")
    before, fresh = snapshot(out), tmp_path / "fresh"
    readers = [("train.py", [f"--out_dir={out}", "--init_from=resume", "--max_iters=20"])]
    if not resume_only:
        readers += [("train.py", [f"--out_dir={fresh}", f"--init_from={out / 'ckpt.pt'}"]),
                    ("sample.py", [f"--out_dir={out}"])]
    for script, args in readers:
        with pytest.raises(ValueError, match=re.escape(f"checkpoint {out / 'ckpt.pt'}") + ".*" + re.escape(words)):
            run_inproc(script, *args)
    assert snapshot(out) == before and not fresh.exists()
    if not torch.cuda.is_available():  # a good checkpoint on a missing GPU is not "corrupt"
        with pytest.raises(ValueError, match="no CUDA GPU"):
            run_inproc("sample.py", f"--out_dir={finished_run}", "--device=cuda")


@pytest.mark.e2e
def test_a_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(finished_run, tmp_path):
    out = fresh_copy(finished_run, tmp_path)
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"iteration 1\d: the (training loss|gradient norm) is (nan|inf)"):
        run_inproc("train.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=40", "--eval_interval=2",
                   "--learning_rate=1e9", "--min_lr=0")
    assert (out / "ckpt.pt").read_bytes() == before[Path("ckpt.pt")]
    assert not list(out.glob("*.tmp"))
    shutil.copytree(finished_run, tmp_path / "again")  # as a script: the progress bar is closed first
    proc = run("train.py", f"--out_dir={tmp_path / 'again'}", "--init_from=resume", "--max_iters=40",
               "--eval_interval=2", "--learning_rate=1e9", "--min_lr=0", check=False)
    assert proc.returncode == 1 and proc.stderr.splitlines()[-1].startswith("error: iteration 1"), proc.stderr[-500:]


def test_a_stale_tmp_file_of_a_killed_write_is_removed_when_the_next_run_takes_the_out_dir(tmp_path):
    (tmp_path / "ckpt.pt.12345.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "ckpt.pt").write_bytes(b"kept")
    lock = checkpoint.lock_out_dir(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "train.lock"]
    lock.close()


@pytest.mark.e2e
def test_a_full_disk_leaves_the_previous_checkpoint(finished_run, tmp_path, monkeypatch):
    out = fresh_copy(finished_run, tmp_path)
    before = (out / "ckpt.pt").read_bytes()

    def full(*args, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ValueError, match="No space left on device; the previous one is unchanged"):
        run_inproc("train.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=12", "--eval_interval=2")
    assert (out / "ckpt.pt").read_bytes() == before and not list(out.glob("*.tmp"))


def _tmpfs(path, size):
    """Mount a tmpfs of `size` bytes at path (root on Linux), or skip the test saying why not."""
    path.mkdir()
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root on Linux")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")


@pytest.mark.e2e
def test_a_really_full_disk_leaves_the_previous_checkpoint_loadable(finished_run, tmp_path):
    """A tmpfs with room for the run but not for a second checkpoint beside the first."""
    disk = tmp_path / "disk"
    used = sum(p.stat().st_size for p in finished_run.iterdir())
    _tmpfs(disk, used + (finished_run / "ckpt.pt").stat().st_size // 2)
    try:
        out = disk / "out"
        shutil.copytree(finished_run, out)
        before = (out / "ckpt.pt").read_bytes()
        proc = run("train.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=12", "--eval_interval=2",
                   check=False)
        _one_error_line(proc, "cannot write checkpoint", "the previous one is unchanged", during_training=True)
        assert (out / "ckpt.pt").read_bytes() == before and not list(out.glob("*.tmp"))
        load_checkpoint(str(out / "ckpt.pt"), resume=True)
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.mark.e2e
def test_a_read_only_out_dir_is_one_error_line_and_stays_unchanged(finished_run, tmp_path):
    out = tmp_path / "ro"
    _tmpfs(out, 16 * 2 ** 20)
    try:
        shutil.copytree(finished_run, out, dirs_exist_ok=True)
        assert subprocess.run(["mount", "-o", "remount,ro", str(out)]).returncode == 0
        before = snapshot(out)
        for args in (["--init_from=resume", "--max_iters=12"], ["--max_iters=2"]):
            _one_error_line(run("train.py", f"--out_dir={out}", *TINY, *args, check=False), "cannot write to --out_dir")
        assert snapshot(out) == before
    finally:
        subprocess.run(["umount", str(out)])


@pytest.mark.e2e
def test_ctrl_c_is_one_line_exit_130_and_the_checkpoint_resumes(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), f"--out_dir={out}", *TINY,
                             "--max_iters=100000", "--eval_interval=5", "--eval_at_start=False"],
                            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # as from a terminal: a runner started in the background ignores SIGINT
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for _ in range(600):  # until the second checkpoint is written
            if (out / "log.jsonl").exists() and '"iter": 10, "val_nats"' in (out / "log.jsonl").read_text():
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    last = stderr.strip().splitlines()[-1]
    assert proc.returncode == 130, stderr[-2000:]
    assert re.fullmatch(r"interrupted at iteration \d+; the last checkpoint is at iteration (\d+); "
                        r"resume with --init_from=resume", last), last
    assert "Traceback" not in stderr
    saved = int(re.search(r"iteration (\d+); resume", last).group(1))
    assert saved >= 10 and saved % 5 == 0
    assert load_checkpoint(str(out / "ckpt.pt"), resume=True)[1]["iter_num"] == saved
    run("train.py", f"--out_dir={out}", "--init_from=resume", f"--max_iters={saved + 2}")


def test_out_of_memory_and_ctrl_c_are_one_line_from_any_script():
    for raise_it, status, line in (
            ("raise MemoryError()", 1, "error: out of memory (MemoryError): lower --x"),
            ("torch.empty(2 ** 62, dtype=torch.uint8)", 1, "error: out of memory (RuntimeError): lower --x"),
            ("raise KeyboardInterrupt", 130, "stopped here")):
        code = ("import torch; from configurator import report_errors; "
                f"report_errors(memory_hint='lower --x', interrupted=lambda: 'stopped here'); {raise_it}")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE, timeout=120)
        assert proc.returncode == status and proc.stderr.strip().splitlines() == [line], proc.stderr[-2000:]


MEMORY = [("train.py", ["--n_embd=2000000", "--n_head=1"], "--n_embd"),
          ("train.py", ["--batch_size=1000000000"], "--batch_size"),
          ("train.py", ["--eval_problems=1000000000"], "--eval_problems"),
          ("train.py", ["--train_size=100000000000"], "--train_size"),
          ("sample.py", ["--num_samples=1000000000"], "--num_samples")]


@pytest.mark.e2e
@pytest.mark.parametrize("script, flags, words", MEMORY, ids=[f"{s} {f[0]}" for s, f, _ in MEMORY])
def test_sizes_beyond_the_machine_are_refused_with_an_estimate_before_any_work(finished_run, tmp_path, script,
                                                                                 flags, words):
    out = fresh_copy(finished_run, tmp_path) if script == "sample.py" else tmp_path / "new"
    before = snapshot(out) if out.exists() else None
    with pytest.raises(ValueError, match=r"this needs about [\d,.]+ GB \(.*" + re.escape(words)):
        run_inproc(script, *(TINY if script == "train.py" else []), f"--out_dir={out}", *flags)
    assert (snapshot(out) if out.exists() else None) == before


@pytest.mark.e2e
def test_text_prompts_are_checked_before_training_and_a_corpus_without_newline_samples_unconditionally(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question. " * 40)
    text = [*TINY, "--task=text", f"--data_path={corpus}", "--block_size=16", "--max_iters=2", "--eval_interval=2",
            "--sample_length=8"]
    for prompt, words in (("\u20ac\u20ac", "not in the vocabulary"), ("to be " * 3, "shorter than block_size=16")):
        with pytest.raises(ValueError, match=words):
            run_inproc("train.py", *text, f"--out_dir={tmp_path / 'refused'}", f"--sample_prompt={prompt}")
        assert not (tmp_path / "refused").exists()
    out = tmp_path / "out"
    proc = run("train.py", *text, f"--out_dir={out}", "--sample_prompt=to be")
    assert "note: this corpus has no newline: the sample is unconditional" in proc.stdout
    proc = run("sample.py", f"--out_dir={out}", "--num_samples=1", "--length=8")
    assert "unconditional" in proc.stdout and len(proc.stdout.splitlines()) == 3


@pytest.mark.e2e
def test_a_second_run_in_a_live_out_dir_stops(finished_run, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    out = fresh_copy(finished_run, tmp_path)
    before = snapshot(out)
    with open(out / "train.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match="another run is using"):
            run_inproc("train.py", *TINY, f"--out_dir={out}", "--init_from=resume", "--max_iters=12")
    assert snapshot(out) == before


BAD_OTHER = [  # (script, flags after --out_dir, words); in-process, against a finished run
    ("sample.py", ["--num_samples=0"], "num_samples"), ("sample.py", ["--block_length=-1"], "block_length"),
]


@pytest.mark.e2e
@pytest.mark.parametrize("script, flags, words", BAD_OTHER, ids=[f"{s} {' '.join(f)}" for s, f, _ in BAD_OTHER])
def test_the_other_scripts_refuse_bad_input_before_any_work(finished_run, tmp_path, script, flags, words):
    out = fresh_copy(finished_run, tmp_path)
    before = snapshot(out)
    with pytest.raises(ValueError, match=words):
        run_inproc(script, f"--out_dir={out}", *flags)
    assert snapshot(out) == before


@pytest.mark.e2e
def test_resuming_text_against_a_data_file_with_another_vocabulary_stops(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n" * 40)
    out = tmp_path / "out"
    run_inproc("train.py", *TINY, "--task=text", f"--data_path={text}", "--block_size=16", f"--out_dir={out}",
               "--max_iters=2", "--eval_interval=2", "--sample_length=4")
    assert torch.load(out / "ckpt.pt", weights_only=True)["vocab"] == sorted(set(text.read_text()))
    text.write_text("THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG!\n" * 40)
    before = snapshot(out)
    with pytest.raises(ValueError, match="vocabulary"):
        run_inproc("train.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=4")
    assert snapshot(out) == before


@pytest.mark.e2e
def test_resume_applies_changeable_flags_and_logs_each_iteration_once(finished_run, tmp_path):
    """Extending max_iters with lr_decay_iters=0 decays to the NEW end (the schedule does not sit at
    min_lr), the checkpoint records the new values, and records written after the checkpoint by a
    run that then crashed are not logged twice."""
    out = fresh_copy(finished_run, tmp_path)
    with open(out / "log.jsonl", "a") as f:  # a crashed run got to iteration 11 after the checkpoint at 10
        f.write(json.dumps({"iter": 11, "loss": 9.9}) + "\n" + '{"iter": 12, "lo')
    run_inproc("train.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=20", "--eval_interval=5")
    log = read_log(out)
    iters = [r["iter"] for r in log if "loss" in r]
    assert iters == list(range(1, 21)) and all(r.get("loss") != 9.9 for r in log)
    lr = {r["iter"]: r["lr"] for r in log if "lr" in r}
    min_lr = 2e-4
    assert lr[12] > lr[15] > lr[20] > min_lr * 1.0001 and lr[12] > 0.5 * 2e-3  # mid-cosine to iter 20
    config = torch.load(out / "ckpt.pt", weights_only=True)["config"]
    assert config["max_iters"] == 20 and config["eval_interval"] == 5 and config["lr_decay_iters"] == 0


# ----------------------------------------------------------------------------- samplers.py
T = 70
T_GRID = torch.linspace(1 / T, 1 - 1 / T, T - 1, dtype=torch.float64)
TRUE_EPR = dict(a=2.0, b=0.5, c=0.3, kappa=1.5, r=1.2, q=3.0, n=2.5)
FS = {"t": (lambda t: t, 1 / 2), "t^2": (lambda t: t ** 2, 1 / 3), "exp": (torch.exp, math.e - 1)}
N = 200_000


def epr_curve(t, params):
    return epr_log_density(t, **{k: torch.tensor(v, dtype=torch.float64) for k, v in params.items()}).exp()


def kl_on_grid(w, p):
    """KL(w || p) on T_GRID, both normalised by the trapezoid rule (the fit's objective)."""
    w, p = w / torch.trapezoid(w, T_GRID), p / torch.trapezoid(p, T_GRID)
    return torch.trapezoid(w * (w / p).log(), T_GRID).item()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def ppots():
    """EPR fit of a curve generated from known EPR parameters (one fit, shared)."""
    return PPOTS(T_GRID, epr_curve(T_GRID, TRUE_EPR))


@pytest.fixture(scope="module")
def samplers(ppots):
    mixed = ppots.state_dict() | {"mix": 0.3}
    u_shaped = PPOTS(T_GRID, (1 / T_GRID + 5 * T_GRID ** 4).sqrt(), fit="none")
    return {"uniform": make_sampler("uniform"), "ppots_epr": ppots, "ppots_none": u_shaped,
            "ppots_mix": sampler_from_state(mixed)}


def draws(sampler, n=N, seed=0):
    return sampler.sample(n, gen(seed))


def weighted_mean_and_se(sampler, f):
    t, w = draws(sampler)
    y = w.double() * f(t.double())
    return y.mean().item(), y.std().item() / math.sqrt(len(y))


@pytest.mark.parametrize("f", FS)
@pytest.mark.parametrize("name", ["uniform", "ppots_epr", "ppots_none", "ppots_mix"])
def test_unbiased(samplers, name, f):
    fn, integral = FS[f]
    mean, se = weighted_mean_and_se(samplers[name], fn)
    assert abs(mean - integral) < 4 * se


@pytest.mark.parametrize("f", FS)
@pytest.mark.parametrize("k", [None, 50])
def test_stratified_unbiased(k, f):
    """Batches of n = 50 (k = None: 8 strata with a remainder of 2; k = 50: one draw per stratum);
    the SE is that of the batch means, which is what stratification shrinks."""
    fn, integral = FS[f]
    sampler, g = make_sampler("stratified", k=k), gen()
    means = torch.stack([(w * fn(t)).double().mean() for t, w in (sampler.sample(50, g) for _ in range(2000))])
    assert abs(means.mean().item() - integral) < 4 * means.std().item() / math.sqrt(len(means))


def test_clipped_range_and_bias():
    sampler = make_sampler("clipped", lo=0.2, hi=0.7)
    t, w = sampler.sample(N, gen())
    assert t.min() >= 0.2 and t.max() <= 0.7 and (w == 1).all()
    assert t.min() < 0.21 and t.max() > 0.69  # it fills [lo, hi], not a point
    fn, integral = FS["t^2"]  # and the 4-SE check used above does flag it as biased
    mean, se = weighted_mean_and_se(sampler, fn)
    assert abs(mean - integral) > 4 * se


def test_stratified_counts():
    n = 37
    t, _ = make_sampler("stratified", k=n).sample(n, gen())
    assert torch.equal((t * n).long().sort().values, torch.arange(n))
    n, k = 50, 8
    for sampler in (make_sampler("stratified", k=k), make_sampler("stratified")):  # default k = ceil(√50) = 8
        counts = torch.bincount((sampler.sample(n, gen())[0] * k).long(), minlength=k)
        assert len(counts) == k and counts.sum() == n
        assert set(counts.tolist()) <= {n // k, n // k + 1} and (counts == n // k + 1).sum() == n % k


def test_ppots_draws_follow_p(ppots):
    """Binned chi-square test on 64 bins of 64 cells each; threshold mean + 5 sd of chi^2_63."""
    bins = 64
    t, _ = draws(ppots)
    observed = torch.bincount((t.double() * bins).long().clamp(max=bins - 1), minlength=bins).double()
    threshold = (bins - 1) + 5 * math.sqrt(2 * (bins - 1))
    chi2 = lambda expected: ((observed - expected) ** 2 / expected).sum().item()
    assert chi2(N * ppots.cdf[::CELLS // bins].diff()) < threshold
    assert chi2(torch.full((bins,), N / bins, dtype=torch.float64)) > threshold  # the test has power


def test_ppots_weight_is_inverse_density(ppots, samplers):
    t, w = draws(ppots)
    cell = (t.double() * CELLS).long().clamp(max=CELLS - 1)
    p_from_cdf = (ppots.cdf[cell + 1] - ppots.cdf[cell]) * CELLS
    assert torch.equal(w, (1 / p_from_cdf).float())
    # and p is the fitted EPR curve, normalised on [0, 1], up to the cell width times |d log p / dt|
    fine = torch.linspace(0, 1, 2 ** 16 + 1, dtype=torch.float64)
    log_p = log_normalise(epr_curve(fine, ppots.params).log(), fine)
    tol = 2 * log_p.diff().abs().max().item() * 2 ** 16 / CELLS
    p_true = torch.from_numpy(np.interp(t.double().numpy(), fine.numpy(), log_p.exp().numpy()))
    assert ((w.double() * p_true - 1).abs() < tol).all()
    t, w = draws(samplers["ppots_mix"])
    assert w.max() <= 1 / 0.3 and torch.allclose(samplers["ppots_mix"].p, 0.7 * ppots.p + 0.3)
    capped = sampler_from_state(ppots.state_dict() | {"max_weight": 1.2})
    t, w = draws(capped)
    assert torch.equal(w, (1 / capped.density(t)).clamp(max=1.2).float()) and (w == w.new_tensor(1.2)).any()


def test_epr_fit_recovers_known_curve(ppots):
    assert kl_on_grid(epr_curve(T_GRID, TRUE_EPR), epr_curve(T_GRID, ppots.params)) < 1e-3


# an EPR curve with 10 % multiplicative noise (its fit's KL is ~3e-3, not 0) and one outside the family
NOISY_EPR = epr_curve(T_GRID, TRUE_EPR) * (1 + 0.1 * torch.randn(T - 1, generator=gen(5), dtype=torch.float64)).abs()
OFF_FAMILY = (1 / T_GRID + 5 * T_GRID ** 4).sqrt()


@pytest.fixture
def lbfgs_runs(monkeypatch):
    """The L-BFGS runs fit_epr makes, one per start, in order: (iterations, history size)."""
    runs = []

    class Counted(torch.optim.LBFGS):
        def step(self, closure):
            loss = super().step(closure)
            runs.append((self.state[self._params[0]]["n_iter"], self.defaults["history_size"]))
            return loss
    monkeypatch.setattr(torch.optim, "LBFGS", Counted)
    return runs


# the 20-start fit that the default replaced, on each curve: fit_epr(T_GRID, curve, n_starts=20,
# agree=None, history_size=100), run once (6 digits; lab.ppots_cost runs it on measured curves)
TWENTY_START_FITS = {
    "noisy_epr": (NOISY_EPR, dict(a=2.16885, b=1.09484, c=0.296122, kappa=2.11842, r=0.821446, q=0.950653,
                                  n=1.00025)),
    "off_family": (OFF_FAMILY, dict(a=0.218759, b=2.36772, c=0.372285, kappa=7.65068e-05, r=8.69513, q=14.7432,
                                    n=7.62729))}


@pytest.mark.parametrize("name", TWENTY_START_FITS)
def test_epr_fit_stops_when_two_starts_agree_and_matches_the_20_start_fit(name, lbfgs_runs):
    """The default fit (L-BFGS history 10, stopping once two starts agree) finds the 20-start fit's
    optimum (KL < 1e-6: the same optimum; the issue asks <= 1e-3) from fewer than its 8 starts, and
    the same params on a second call."""
    curve, twenty = TWENTY_START_FITS[name]
    fast = fit_epr(T_GRID, curve)
    assert 2 <= len(lbfgs_runs) < 8 and {h for _, h in lbfgs_runs} == {10}
    assert kl_on_grid(epr_curve(T_GRID, twenty), epr_curve(T_GRID, fast)) < 1e-6
    assert fit_epr(T_GRID, curve) == fast


def test_epr_refit_starts_from_the_previous_fit(lbfgs_runs):
    """init= (PPOTS, build_ppots: a refit's previous params) is the first start: on the same curve it
    is already the optimum, so L-BFGS stops within 3 iterations and the law is the previous one."""
    first = fit_epr(T_GRID, NOISY_EPR)
    lbfgs_runs.clear()
    again = PPOTS(T_GRID, NOISY_EPR, init=first).params
    assert lbfgs_runs[0][0] <= 3 and kl_on_grid(epr_curve(T_GRID, first), epr_curve(T_GRID, again)) < 1e-9
    lbfgs_runs.clear()
    only_warm = fit_epr(T_GRID, OFF_FAMILY, n_starts=0, init=first)  # no random start: init's optimum
    assert len(lbfgs_runs) == 1 and lbfgs_runs[0][0] > 3 and only_warm != first
    with pytest.raises(ValueError, match="every start"):
        fit_epr(T_GRID, NOISY_EPR, n_starts=0)


def test_ppots_optimal_when_p_proportional_to_f():
    """p ∝ f makes w f(t) = f/p ≈ int f a constant: near-zero variance, against int f^2 - (int f)^2 = 0.8
    for uniform t. The Monte Carlo variance must match the quadrature prediction int f^2/p - (int f)^2."""
    f = lambda t: 1 + 3 * t ** 2
    sampler = PPOTS(T_GRID, f(T_GRID), fit="none")
    t, w = draws(sampler)
    y = w.double() * f(t.double())
    mid = (torch.arange(CELLS * 16, dtype=torch.float64) + 0.5) / (CELLS * 16)
    predicted = (f(mid) ** 2 / sampler.density(mid)).mean().item() - 2.0 ** 2
    se_var = math.sqrt(((y - y.mean()) ** 4).mean().item() - y.var().item() ** 2) / math.sqrt(N)
    assert abs(y.var().item() - predicted) < 4 * se_var
    uniform = f(torch.rand(N, generator=gen(), dtype=torch.float64))
    se_uniform = math.sqrt(((uniform - uniform.mean()) ** 4).mean().item() - 0.8 ** 2) / math.sqrt(N)
    assert abs(uniform.var().item() - 0.8) < 4 * se_uniform
    assert predicted < 1e-3 * 0.8


def save_and_load(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=True)


def same_draws(a, b, seed=3):
    return all(torch.equal(x, y) for x, y in zip(a.sample(1000, gen(seed)), b.sample(1000, gen(seed))))


@pytest.mark.parametrize("name, kw", [("uniform", {}), ("stratified", {"k": 5}), ("clipped", {"lo": 0.2, "hi": 0.7}),
                                      ("ppots", None)])
def test_state_dict_round_trip(ppots, name, kw, monkeypatch):
    """Rebuilt by sampler_from_state from a weights_only save: identical draws, P-POTS not refitted."""
    sampler = ppots if name == "ppots" else make_sampler(name, **kw)
    sd = save_and_load(sampler.state_dict())
    monkeypatch.setattr("samplers.fit_epr", lambda *a, **k: pytest.fail("refitted on load"))
    rebuilt = sampler_from_state(sd)
    assert type(rebuilt) is type(sampler) and same_draws(sampler, rebuilt)


def test_state_dict_keeps_online_bins():
    fitted = PPOTS(T_GRID, torch.ones(T - 1), fit="none")
    sampler = OnlinePPOTS(fitted)
    assert same_draws(sampler, fitted) and sampler.count.sum() == 0  # wrapping changes no draw
    sampler.observe(torch.rand(500, generator=gen(1)), torch.rand(500, generator=gen(2)))
    sd = save_and_load(sampler.state_dict())
    with pytest.raises(ValueError, match="ppots_online"):  # the core knows only the core laws
        sampler_from_state(sd)
    rebuilt = restore_sampler(sd)
    assert isinstance(rebuilt, OnlinePPOTS) and torch.equal(rebuilt.sum_l2, sampler.sum_l2)
    for s in (sampler, rebuilt):
        s.observe(torch.rand(500, generator=gen(5)), torch.rand(500, generator=gen(6)))
        s.refit_online()
    assert not torch.equal(rebuilt.sqrt_m, torch.ones(T - 1, dtype=torch.float64))
    assert same_draws(sampler, rebuilt)


def test_online_refit_moves_toward_sqrt_m():
    """Feed l = √m(t) z, z ~ N(0, 1), t ~ U(0, 1), so E[l^2 | t] = m(t); start from a flat curve."""
    sqrt_m = lambda t: epr_curve(t, TRUE_EPR)
    sampler = OnlinePPOTS(PPOTS(T_GRID, torch.ones(T - 1)))
    before = kl_on_grid(sqrt_m(T_GRID), sampler.density(T_GRID))
    t = torch.rand(N, generator=gen(1), dtype=torch.float64)
    sampler.observe(t.float(), (sqrt_m(t) * torch.randn(N, generator=gen(2), dtype=torch.float64)).float())
    sampler.refit_online()
    after = kl_on_grid(sqrt_m(T_GRID), sampler.density(T_GRID))
    assert after < before / 10 and sampler.count.sum() == 0


def test_online_bins_without_data_keep_estimate():
    sampler = OnlinePPOTS(PPOTS(T_GRID, torch.ones(T - 1), fit="none"))
    t = torch.cat([torch.zeros(10), 0.5 * torch.rand(1000, generator=gen(1))])  # t = 0 lies off the grid
    sampler.observe(t, torch.full_like(t, 3.0))
    assert sampler.count.sum() < len(t)
    sampler.refit_online()
    seen = T_GRID < 0.5 - 1 / (2 * T)
    assert torch.allclose(sampler.sqrt_m[seen], torch.tensor(3.0, dtype=torch.float64))
    assert (sampler.sqrt_m[T_GRID > 0.5 + 1 / (2 * T)] == 1).all()


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(block_size=9, n_layer=1, n_head=2, n_embd=16)), get_task("sort", num_digits=4)


@pytest.mark.parametrize("training", [True, False])
def test_measure_curve(tiny_model, training):
    model, task = tiny_model
    model.train(training)
    kw = dict(T=10, n_x0=4, n_masks=3)
    curve = measure_curve(model, task, generator=gen(1), **kw)
    assert model.training == training
    assert all(len(curve[k]) == 9 for k in ("t", "m", "g", "v"))
    assert torch.isfinite(curve["m"]).all() and (curve["m"] > 0).all()
    for other in (measure_curve(model, task, generator=gen(1), **kw),
                  measure_curve(model, task, generator=gen(1), batch_rows=7, **kw),  # chunking changes nothing
                  measure_curve(model, task, generator=gen(1), forward_rows=5, **kw)):
        assert all(torch.allclose(curve[k], other[k], rtol=1e-5) for k in curve)
    pair = measure_curve(model, task, MaskSpec("pair"), generator=gen(1), batch_rows=16, **kw)  # pair's draws depend on batch_rows
    for forward_rows in (3, 16):  # ... but not the forward passes
        other = measure_curve(model, task, MaskSpec("pair"), generator=gen(1), batch_rows=16, forward_rows=forward_rows, **kw)
        assert all(torch.allclose(pair[k], other[k], rtol=1e-5) for k in pair)
    # m = mean_x0(g_x^2 + v_x (n-1)/n) >= (mean_x0 g_x)^2 + mean_x0 v_x (n-1)/n: the x0 spread of g is in m
    assert (curve["m"] >= (curve["g"] ** 2 + curve["v"] * 2 / 3) * (1 - 1e-5)).all()
    sampler = build_ppots(model, task, generator=gen(1), fit="none", **kw)
    assert torch.allclose(sampler.sqrt_m.float(), curve["m"].sqrt())


def test_measure_curve_includes_spread_of_g_across_x0(tiny_model):
    """A causal (ARM) model's loss ignores t and the mask, l = arm_loss(x0): so v = 0, and m must be
    mean_x0 l^2, strictly above g^2 = (mean_x0 l)^2, which is all the paper code's g^2 + v would give."""
    task = tiny_model[1]
    torch.manual_seed(0)
    model = Transformer(ModelConfig(block_size=9, n_layer=1, n_head=2, n_embd=16, causal=True))
    curve = measure_curve(model, task, T=4, n_x0=8, n_masks=2, generator=gen(1))
    x0, eligible = task.batch(8, "train", gen(1))
    with torch.no_grad():
        l = arm_loss(model(x0), x0, eligible)
    assert torch.allclose(curve["v"], torch.zeros(3), atol=1e-10)
    assert torch.allclose(curve["m"], (l ** 2).mean().expand(3)) and (curve["m"] > curve["g"] ** 2 * (1 + 1e-4)).all()


def test_describe_plot_and_bad_name(ppots, samplers, tmp_path):
    assert "kappa=" in describe_fit(ppots) and "vs uniform" in describe_fit(ppots)
    ours, best = second_moments(ppots)  # Cauchy–Schwarz: no p beats p ∝ √m; fit='none' is p ∝ √m
    assert best <= ours < 1 and math.isclose(*second_moments(samplers["ppots_none"]), rel_tol=1e-4)
    plot_ppots(ppots, tmp_path / "ppots.png")
    assert (tmp_path / "ppots.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="nope"):
        make_sampler("nope")


# ----------------------------------------------------------------------------- variance.py
def tiny_net(causal=False, dropout=0.0):
    torch.manual_seed(0)
    return Transformer(ModelConfig(n_layer=1, n_head=2, n_embd=32, causal=causal, dropout=dropout))


def within_se(samples, truth, k=4.0):
    """Is the mean of `samples` within k standard errors of `truth`? (and the distance in SEs)"""
    x = torch.tensor(samples, dtype=torch.float64)
    z = (x.mean() - truth).abs() / (x.std() / math.sqrt(len(x)))
    return z.item() < k, z.item()


@pytest.mark.parametrize("a,b,c", [(20, 3, 2), (20, 2, 4), (30, 2, 2), (10, 5, 3)])
def test_decompose_unbiased_and_naive_biased(a, b, c):
    """L_ijk = mu + alpha_i + beta_ij + eps_ijk: E[A, B, C] = (s_eps^2, s_beta^2, s_alpha^2)."""
    s2 = dict(C=1.0, B=0.5, A=2.0)
    g = torch.Generator().manual_seed(a * 100 + b * 10 + c)
    est, naive = {k: [] for k in "ABC"}, {k: [] for k in "ABC"}
    for _ in range(2000):
        L = (3.0 + math.sqrt(s2["C"]) * torch.randn(a, 1, 1, generator=g)
             + math.sqrt(s2["B"]) * torch.randn(a, b, 1, generator=g)
             + math.sqrt(s2["A"]) * torch.randn(a, b, c, generator=g))
        r, n = decompose(L), naive_decompose(L)
        assert r["total"] == pytest.approx(r["A"] + r["B"] + r["C"])
        for k in "ABC":
            est[k].append(r[k])
            naive[k].append(n[k])
    for k in "ABC":
        ok, z = within_se(est[k], s2[k])
        assert ok, f"{k}: unbiased estimate is {z:.1f} SE from the truth {s2[k]}"
    assert not all(within_se(naive[k], s2[k])[0] for k in "BC"), "plug-in B and C look unbiased"


def test_decompose_vector_is_sum_of_coordinates():
    g = torch.Generator().manual_seed(1)
    L = torch.randn(8, 3, 4, 5, generator=g) * torch.tensor([0.1, 1.0, 3.0, 0.5, 2.0])
    per = [decompose(L[..., k]) for k in range(5)]
    whole = decompose(L)
    for k in ("A", "B", "C", "total"):
        assert whole[k] == pytest.approx(sum(p[k] for p in per), rel=1e-9)


def test_decompose_needs_two_of_each():
    with pytest.raises(ValueError):
        decompose(torch.randn(4, 3, 1))


@pytest.mark.parametrize("target", ["loss", "grad"])
def test_arm_has_exactly_zero_A_and_B(target):
    task = get_task("sort", num_digits=4)
    r = measure(tiny_net(causal=True), task, make_sampler("uniform"), MaskSpec(), 6, 3, 2, target=target,
                generator=torch.Generator().manual_seed(0), n_batches=4, n_proj=2)
    assert r["A"] == 0.0 and r["B"] == 0.0
    assert r["C"] > 0.0


def test_arm_batch_var_is_C_over_batch_size():
    """An ARM's batch mean averages batch_size iid x0 draws: E[batch_var] = C / batch_size."""
    task, model = get_task("sort", num_digits=4), tiny_net(causal=True)
    diff = []
    for seed in range(20):
        r = measure(model, task, make_sampler("uniform"), MaskSpec(), 32, 2, 2, batch_size=8, n_batches=32,
                    generator=torch.Generator().manual_seed(seed))
        diff.append(8 * r["batch_var"] - r["C"])
    ok, z = within_se(diff, 0.0)
    assert ok, f"8 * batch_var - C is {z:.1f} SE from 0"


@pytest.mark.parametrize("target", ["loss", "grad"])
def test_fixed_generator_is_deterministic(target):
    task, model = get_task("sort", num_digits=4), tiny_net(dropout=0.5)  # eval mode must switch it off
    model.train()
    run = lambda seed: measure(model, task, make_sampler("uniform"), MaskSpec("mirror"), 4, 3, 2, target=target, n_batches=4,
                               n_proj=2, max_rows=10, generator=torch.Generator().manual_seed(seed))
    first = run(0)
    assert run(0) == first
    assert run(1) != first
    assert model.training, "the training flag must be restored"


def test_pair_halves_A_and_mirror_does_better():
    """Pair averages two independent masks: E[A_pair] = E[A_standard] / 2 exactly, for any model.
    MIRROR's views are anti-correlated (strongly for p near 1/2, hence t in [0.2, 0.8]; a random-init
    model's CE hardly depends on the rest of the mask): A_mirror < A_pair. Same seed -> same x0 and t
    for the three maskings, so the comparisons are paired per seed."""
    task, model = get_task("sort", num_digits=4), tiny_net()
    half, gain = [], []
    for seed in range(12):
        A = {m: measure(model, task, make_sampler("clipped", lo=0.2, hi=0.8), MaskSpec(m), 8, 4, 4, n_batches=2,
                        generator=torch.Generator().manual_seed(seed))["A"]
             for m in ("standard", "pair", "mirror")}
        half.append(A["pair"] - A["standard"] / 2)
        gain.append(A["pair"] - A["mirror"])
    ok, z = within_se(half, 0.0)
    assert ok, f"A_pair - A_standard / 2 is {z:.1f} SE from 0"
    g = torch.tensor(gain)
    assert g.mean() > 4 * g.std() / math.sqrt(len(g)), "A_mirror is not clearly below A_pair"


def test_format_line_and_plot(tmp_path):
    res = lambda s: dict(A=0.412 * s, B=0.0513 * s, C=-0.001 * s)
    line = format_line(400, res(1), res(100))
    assert line == "iter 400 | loss A 0.412 B 0.0513 C -0.001 | grad A 41.2 B 5.13 C -0.1"
    path = tmp_path / "variance.png"
    plot_variance([{"iter": i, "loss": res(1), "grad": res(i)} for i in (0, 250, 500)], path)
    assert path.stat().st_size > 1000


def test_grad_projections_match_autograd():
    """target='grad' uses jvp: row r, direction u must give <d(l_r w_r)/d theta, u> (autograd),
    with the same masks as the loss pass (same seed), and unit-norm directions."""
    task, model = get_task("sort", num_digits=4), tiny_net()
    x0, eligible = task.batch(3, "train", torch.Generator().manual_seed(0))
    t, w = torch.tensor([0.2, 0.5, 0.9]), torch.tensor([1.0, 2.0, 0.5])
    dirs = variance._directions(model, 2)
    assert all(sum(v.square().sum() for v in u.values()).item() == pytest.approx(1.0) for u in dirs)
    proj = variance._draws(model, x0, eligible, t, w, MaskSpec("mirror"), 7, 2, dirs)
    loss = variance._draws(model, x0, eligible, t, w, MaskSpec("mirror"), 7, 2)
    params = dict(model.named_parameters())
    for r in range(3):
        gen = torch.Generator().manual_seed(7 + r // 2)  # chunks of max_rows = 2 rows
        rows = slice(2 * (r // 2), 2 * (r // 2) + 2)
        l = row_losses(model, x0[rows], eligible[rows], t[rows], MaskSpec("mirror"), gen) * w[rows]
        assert l[r % 2].item() == pytest.approx(loss[r].item(), rel=1e-5)
        grads = torch.autograd.grad(l[r % 2], list(params.values()))
        for k, u in enumerate(dirs):
            expect = sum((g * u[name]).sum() for g, name in zip(grads, params)).item()
            assert proj[r, k].item() == pytest.approx(expect, rel=1e-3, abs=1e-7)


# ----------------------------------------------------------------------------- ISAD, SyRM, EMA control variate, weight EMA
MB, MT, MV = 4, 9, 6
S = torch.zeros(MT, dtype=torch.bool)
S[[3, 6]] = True  # an ISAD critical set inside the response
SYNTAX = torch.zeros(MT, dtype=torch.bool)
SYNTAX[1] = True  # a syntax token inside the 2-token prompt


def fixed_isad_problem(seed=0):
    """Fixed logits, clean tokens, and eligible (response) positions after a 2-token prompt."""
    g = gen(seed)
    logits = torch.randn(MB, MT, MV, generator=g)
    x0 = torch.randint(0, MV, (MB, MT), generator=g)
    eligible = torch.ones(MB, MT, dtype=torch.bool)
    eligible[:, :2] = False
    return logits, x0, eligible


class Frozen(torch.nn.Module):
    """A 'model' whose logits ignore the input: the loss is then linear in the mask indicators, so its
    mean over masks has a closed form. Rows are the B fixed rows repeated."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.config = logits, SimpleNamespace(causal=False, mask_id=MV)

    def forward(self, idx):
        return self.logits.repeat(idx.shape[0] // len(self.logits), 1, 1)


def ce_of(logits, x0):
    return F.cross_entropy(logits.transpose(1, 2), x0, reduction="none")


def mc_check(samples, truth):
    """Per-row Monte Carlo means of samples [N, B] within 4 standard errors of truth [B]."""
    se = samples.double().std(0) / math.sqrt(len(samples))
    assert ((samples.double().mean(0) - truth).abs() <= 4 * se + 1e-6).all(), (samples.mean(0), truth, se)


# ----------------------------------------------------------------------------- ISAD
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_isad_masks_S_at_min_1_p_plus_delta_and_the_rest_at_p(p):
    _, _, eligible = fixed_isad_problem()
    N, delta = 20000, 0.2
    el, pv = eligible.repeat(N, 1), torch.full((N * MB,), p)
    q = isad_rates(pv, S, delta)
    truth = torch.where(S, min(1.0, p + delta), p)
    views = (random_mask(el, q, gen(1)), *mirror_masks(el, q, gen(2)))
    for m in views:
        assert not m[:, :2].any()  # the prompt
        rate = m.double().mean(0)
        se = (truth * (1 - truth) / len(m)).sqrt()
        assert ((rate - truth)[2:].abs() <= 4 * se[2:] + 1e-12).all(), (rate, truth)


@pytest.mark.parametrize("mode", ["standard", "mirror", "pair"])
@pytest.mark.parametrize("t", [0.05, 0.5, 0.9])
def test_isad_keeps_the_standard_mean_only_when_token_losses_ignore_the_context(mode, t):
    """Fixed logits (no token's CE depends on the mask): E[l] under ISAD (q = min(1, p + Delta) on S,
    weight 1/q) equals E[l] under standard masking, (1/P) sum_eligible CE_i, through row_losses. The
    next test shows that this does not carry over to a model that reads its context."""
    logits, x0, eligible = fixed_isad_problem()
    ce = ce_of(logits, x0)
    exact = (ce * eligible).sum(1) / eligible.sum(1)
    N = 20000
    spec = SupplementarySpec(mode, isad=S, isad_delta=0.2)
    L = row_losses(Frozen(logits), x0.repeat(N, 1), eligible.repeat(N, 1), torch.full((N * MB,), t), spec, gen(3))
    mc_check(L.view(N, MB), exact.double())


class Peeking(torch.nn.Module):
    """A 'model' whose prediction of token 1 reads token 0: CE_1 = ce_seen when token 0 is visible,
    ce_hidden when it is masked; every other logit is fixed. Sequence [x0, x1], both maskable."""

    def __init__(self, ce_seen=0.1, ce_hidden=2.0):
        super().__init__()
        self.config = SimpleNamespace(causal=False, mask_id=2)
        self.ce_seen, self.ce_hidden = ce_seen, ce_hidden

    def forward(self, idx):
        """Targets are class 0; logits (0, z, -inf) give CE = log(1 + e^z), so z = log(e^CE - 1)."""
        z = lambda ce: math.log(math.expm1(ce))
        hidden = idx[:, 0] == self.config.mask_id
        logits = torch.zeros(len(idx), 2, 3)
        logits[:, 0, 1] = z(0.5)
        logits[:, 1, 1] = torch.where(hidden, z(self.ce_hidden), z(self.ce_seen))
        logits[:, :, 2] = -1e4  # never [MASK]
        return logits


@pytest.mark.parametrize("t", [0.2, 0.6])
def test_isad_is_a_different_objective_when_token_losses_read_the_context(t):
    """S = {token 0} masked at q = p + Delta: token 1 then sees a masked token 0 more often, so
    E[l_ISAD] = (CE_0 + q CE_1^hidden + (1 - q) CE_1^seen) / 2 differs from the standard
    (CE_0 + p CE_1^hidden + (1 - p) CE_1^seen) / 2 by (q - p)(CE_1^hidden - CE_1^seen) / 2: the 1/q
    weights keep each token's marginal weight, not the ELBO. Both means are checked within 4 SE."""
    model, N, delta = Peeking(), 200_000, 0.3
    x0, eligible = torch.zeros(N, 2, dtype=torch.long), torch.ones(N, 2, dtype=torch.bool)
    tt = torch.full((N,), t)
    p = mask_rate(torch.tensor(t)).item()
    q = min(1.0, p + delta)
    mean = lambda r: (0.5 + r * 2.0 + (1 - r) * 0.1) / 2
    isad = row_losses(model, x0, eligible, tt, SupplementarySpec(isad=torch.tensor([True, False]), isad_delta=delta), gen(1))
    plain = row_losses(model, x0, eligible, tt, MaskSpec(), gen(2))
    for L, truth in ((isad, mean(q)), (plain, mean(p))):
        se = L.double().std() / math.sqrt(N)
        assert abs(L.double().mean() - truth) <= 4 * se, (L.mean(), truth, se)
    gap, se_gap = isad.double().mean() - plain.double().mean(), math.hypot(isad.std(), plain.std()) / math.sqrt(N)
    assert gap > 8 * se_gap and abs(gap - (q - p) * 1.9 / 2) <= 4 * se_gap


# ----------------------------------------------------------------------------- SyRM
def test_syrm_with_alpha_1_is_the_standard_loss_exactly():
    logits, x0, eligible = fixed_isad_problem()
    p = mask_rate(torch.tensor([0.1, 0.4, 0.7, 1.0]))
    mask = random_mask(eligible | SYNTAX, p, gen(4))
    assert mask[:, 1].any()  # the syntax token is masked in some row: it must still not count
    assert torch.equal(syrm_loss(logits, x0, mask, eligible, SYNTAX.expand(MB, MT), p, 1.0),
                       mdm_loss(logits, x0, mask & eligible, eligible, p))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=9))
    task = get_task("sort", num_digits=4)
    x0, eligible = task.batch(MB, "train", gen(5))
    t = torch.rand(MB, generator=gen(6))
    off = mask_spec_from_config({"masking": "mirror", "isad_tokens": "none", "isad_delta": 0.2, "syrm_alpha": 1.0}, task)
    assert type(off) is MaskSpec and off.mode == "mirror" and str(off) == "mirror"  # SyRM off
    same = lambda m: row_losses(model, x0, eligible, t, m, gen(7))
    assert torch.equal(same(off), same(MaskSpec("mirror")))


@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_syrm_loss_is_alpha_mix_of_response_and_syntax_means(alpha):
    """E[L] = alpha mean_response CE + (1 - alpha) mean_syntax CE: each part normalised by its own count."""
    logits, x0, eligible = fixed_isad_problem()
    ce = ce_of(logits, x0)
    exact = alpha * (ce * eligible).sum(1) / eligible.sum(1) + (1 - alpha) * ce[:, 1]
    N = 20000
    spec = SupplementarySpec("standard", syntax=SYNTAX, syrm_alpha=alpha)
    L = row_losses(Frozen(logits), x0.repeat(N, 1), eligible.repeat(N, 1), torch.full((N * MB,), 0.3), spec, gen(8))
    mc_check(L.view(N, MB), exact.double())


def test_task_sets_of_isad_and_syrm():
    sort, add = get_task("sort", num_digits=8), get_task("add", num_digits=3)
    assert sort.isad_positions().nonzero().flatten().tolist() == [11, 12, 13, 14]  # middle half of the response
    assert add.isad_positions().nonzero().flatten().tolist() == [8, 9]  # carry-out and leading digit
    assert sort.isad_positions("first").nonzero().flatten().tolist() == [9]
    for task, where in ((sort, [8]), (add, [3, 7])):
        x0, eligible = task.batch(16, "train", gen(9))
        syntax = task.syntax_positions()
        assert syntax.nonzero().flatten().tolist() == where and not (syntax & eligible).any()
        assert (x0[:, syntax] >= 10).all() and (x0[:, :task.prompt_len][:, ~syntax[:task.prompt_len]] < 10).all()
        assert not (task.isad_positions() & ~eligible[0]).any()
    with pytest.raises(ValueError, match="bogus"):
        sort.isad_positions("bogus")


def test_masking_options_reach_variance_measure_and_log_as_json():
    task = get_task("sort", num_digits=4)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=9))
    spec = mask_spec_from_config({"masking": "mirror", "isad_tokens": "default", "isad_delta": 0.2, "syrm_alpha": 0.8}, task)
    run = lambda m: measure(model, task, make_sampler("uniform"), m, 4, 2, 2, generator=gen(0), n_batches=2)
    with_options, plain = run(spec), run(MaskSpec("mirror"))
    assert json.loads(json.dumps(with_options))["masking"] == "mirror+isad+syrm"
    assert with_options["A"] != plain["A"]
    with pytest.raises(ValueError, match="isad_delta"):
        SupplementarySpec("standard", isad_delta=0.0)


# ----------------------------------------------------------------------------- EMA control variate
def stream(cv, sampler, steps, seed, batch=32):
    """Synthetic losses with a t-dependent mean, l = g(t) + noise: the raw step values w l and the
    values adjusted by the control variate, float64[steps] each."""
    g, raw, adj = gen(seed), [], []
    for _ in range(steps):
        t, w = sampler.sample(batch, g)
        l = 1 / (t + 0.05) + 0.5 * torch.randn(batch, generator=g)
        raw.append((w * l).double().mean().item())
        adj.append(raw[-1] - cv.correction(t, w, l).item())
    return torch.tensor(raw, dtype=torch.float64), torch.tensor(adj, dtype=torch.float64)


def test_control_variate_keeps_the_mean_and_lowers_the_variance():
    raw, adj = stream(LossControlVariate(10, 0.05), make_sampler("uniform"), 1500, 0)
    raw, adj = raw[200:], adj[200:]
    diff = adj - raw  # = -c mean b~: zero-mean given the past
    assert abs(diff.mean()) <= 4 * diff.std() / math.sqrt(len(diff))
    se = lambda x: math.sqrt(((x - x.mean()) ** 4).mean().item() / len(x))  # SE of a variance (>= the usual)
    assert adj.var() + 4 * se(adj) < raw.var() - 4 * se(raw), (adj.var(), raw.var())


def test_control_is_zero_mean_under_a_non_uniform_unbiased_sampler():
    """b~ = w b_{j(t)} - mean_j b_j has mean 0 for fixed baselines under P-POTS (w = 1/p(t))."""
    grid = torch.linspace(0.02, 0.98, 49)
    sampler = PPOTS(grid, 1 / grid.sqrt(), fit="none")
    cv = LossControlVariate(10, 0.05)
    stream(cv, sampler, 50, 1)
    b = cv.baselines()
    assert b.std() > 0.1 * b.mean()
    t, w = sampler.sample(200000, gen(2))
    h = w.double() * b[(t * 10).long().clamp(max=9)] - b.mean()
    assert abs(h.mean()) <= 4 * h.std() / math.sqrt(len(h))


def test_control_variate_leaves_the_gradient_bit_identical():
    task = get_task("sort", num_digits=4)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=9))
    x0, eligible = task.batch(16, "train", gen(0))
    t, w = make_sampler("uniform").sample(16, gen(1))
    cv = LossControlVariate(10, 0.05)
    stream(cv, make_sampler("uniform"), 100, 2, batch=16)
    grads = []
    for adjust in (False, True):
        model.zero_grad()
        losses = row_losses(model, x0, eligible, t, MaskSpec(), gen(3))
        loss = (w * losses).mean()
        if adjust:
            correction = cv.correction(t, w, losses)
            assert correction != 0.0
            loss = loss - correction
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_control_variate_state_round_trip():
    cv = LossControlVariate(10, 0.05)
    stream(cv, make_sampler("uniform"), 30, 0)
    buf = io.BytesIO()
    torch.save(cv.state_dict(), buf)
    other = LossControlVariate(3, 0.5)
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert torch.equal(stream(cv, make_sampler("uniform"), 20, 1)[1], stream(other, make_sampler("uniform"), 20, 1)[1])
    with pytest.raises(ValueError, match="cv_bins"):
        LossControlVariate(0, 0.05)


# ----------------------------------------------------------------------------- weight EMA
def test_weight_ema_with_decay_0_is_the_weights_and_otherwise_the_average():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=9))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    ema0, ema_half = WeightEMA(model, 0.0), WeightEMA(model, 0.5)
    for step in range(3):
        before = [p.detach().clone() for p in ema_half.module.parameters()]
        model(torch.randint(0, 12, (2, 9))).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema0.update_parameters(model)
        ema_half.update_parameters(model)
        assert all(torch.equal(a, b) for a, b in zip(ema0.module.parameters(), model.parameters()))
        if step:  # the first update copies the weights; then theta_ema <- (theta_ema + theta) / 2
            assert all(torch.allclose(e, (b + p) / 2) for e, b, p in
                       zip(ema_half.module.parameters(), before, model.parameters()))
    with pytest.raises(ValueError, match="weight_ema_decay"):
        WeightEMA(model, 1.0)


@pytest.mark.e2e
def test_resume_with_every_method_on_is_bit_exact_for_losses_ema_weights_and_control_variate(tmp_path):
    """ISAD + SyRM + MIRROR + the control variate + weight EMA: 8 iterations straight, against 4 then a
    resume to 8. Same logged losses (adjusted and raw), same final EMA weights and control-variate state."""
    common = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=32", "--num_digits=4", "--eval_problems=32",
              "--eval_iters=1", "--variance_interval=0", "--warmup_iters=2", "--log_interval=1", "--eval_interval=4",
              "--masking=mirror", "--isad_tokens=default", "--syrm_alpha=0.9", "--cv_bins=4", "--cv_eta=0.2",
              "--weight_ema_decay=0.9", "--lr_decay_iters=8"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train = lambda *a: subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *a], capture_output=True,
                                      text=True, cwd=HERE, timeout=300)
    for args in ((f"--out_dir={full}", "--max_iters=8", *common), (f"--out_dir={part}", "--max_iters=4", *common),
                 (f"--out_dir={part}", "--max_iters=8", "--init_from=resume")):
        proc = train(*args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    logs = lambda d: [(r["iter"], r["loss"], r["loss_raw"]) for r in map(json.loads, open(os.path.join(d, "log.jsonl")))
                      if "loss_raw" in r]
    assert logs(part) == logs(full) and len(logs(full)) == 8
    assert any(loss != raw for _, loss, raw in logs(full))  # the control variate did adjust the values
    ckpt = {d: torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (full, part)}
    assert all(torch.equal(ckpt[full]["ema"][k], ckpt[part]["ema"][k]) for k in ckpt[full]["ema"])
    assert all(torch.equal(torch.as_tensor(ckpt[full]["loss_cv"][k]), torch.as_tensor(ckpt[part]["loss_cv"][k]))
               for k in ckpt[full]["loss_cv"])
    evaluated, _ = load_checkpoint(os.path.join(full, "ckpt.pt"))
    trained, _ = load_checkpoint(os.path.join(full, "ckpt.pt"), raw=True)
    assert torch.equal(evaluated.lm_head.weight, ckpt[full]["ema"]["lm_head.weight"])
    assert torch.equal(trained.lm_head.weight, ckpt[full]["model"]["lm_head.weight"])
    assert not torch.equal(evaluated.lm_head.weight, trained.lm_head.weight)


# ----------------------------------------------------------------------------- speed and scale: precision, compile, DDP
@pytest.mark.parametrize("mode", ["standard", "mirror", "pair", "isad+syrm"])
def test_masks_drawn_for_the_batch_then_sliced_give_the_rows_of_one_call(tiny_model, mode):
    """What DDP and gradient accumulation rely on: a micro-batch given its rows of the batch's masks computes
    exactly the losses that one call on the whole batch computes for those rows."""
    model, task = tiny_model
    masking = (SupplementarySpec("mirror", isad=task.isad_positions(), syntax=task.syntax_positions(), syrm_alpha=0.8)
               if mode == "isad+syrm" else MaskSpec(mode))
    x0, eligible = task.batch(12, "train", gen(0))
    t = torch.rand(12, generator=gen(1))
    with torch.no_grad():
        whole = row_losses(model, x0, eligible, t, masking, gen(2))
        masks = draw_masks(eligible, t, masking, gen(2))
        parts = [row_losses(model, x0[s], eligible[s], t[s], masking, masks=tuple(m[s] for m in masks))
                 for s in (slice(0, 4), slice(4, 6), slice(6, 12))]
    assert len(masks) == (1 if mode == "standard" else 2)
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-6, atol=1e-6)


def test_loss_weights_stay_float32_under_bfloat16_autocast():
    """The 1/p weight (p down to eps = 1e-3) is applied in float32 whatever the autocast dtype: bfloat16 keeps
    8 significant bits, so p itself would be off by up to 0.4 % (shown below) and so would the loss."""
    logits, x0, eligible = fixed_problem()
    logits = logits.bfloat16()
    t = torch.tensor([0.0, 1e-3, 0.0137, 0.3, 0.77, 1.0])
    p = mask_rate(t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mdm_loss(logits, x0, eligible, eligible, p)
    ce = F.cross_entropy(logits.double().transpose(1, 2), x0, reduction="none")
    exact = (ce * eligible).sum(1) / (p.double() * eligible.sum(1))
    assert loss.dtype == torch.float32
    assert ((loss.double() - exact).abs() / exact).max() < 1e-6
    assert ((p.bfloat16().double() - p.double()).abs() / p.double()).max() > 1e-3  # what bfloat16 weights would cost


SYNC_METHODS = ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy")


@pytest.mark.e2e
@pytest.mark.parametrize("flags", [[], ["--masking=mirror"], ["--masking=pair"], ["--t_sampler=ppots", "--ppots_fit_iter=0"],
                                   ["--weight_ema_decay=0.9"], ["--cv_bins=4"], ["--gradient_accumulation_steps=2"]],
                         ids=["standard", "mirror", "pair", "ppots", "weight-ema", "control-variate", "accumulation"])
def test_the_training_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch, flags):
    """Every Python-level way to read a tensor's value (item, bool, float, int, tolist, cpu, numpy) is counted
    over the 20 steps between two log intervals: after one log record, until the next log interval's read of
    the non-finite flag. On a GPU each of them would wait for the queued kernels."""
    counts, counting = {}, [False]
    for name in SYNC_METHODS:
        def counted(self, *a, _orig=getattr(torch.Tensor, name), _name=name, **kw):
            if counting[0]:
                counts[_name] = counts.get(_name, 0) + 1
            return _orig(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)
    record, health = checkpoint.LogWindow.record, step_module.Step.health

    def record_then_count(self, *a, **kw):
        out = record(self, *a, **kw)
        counting[0] = True
        return out

    def stop_counting(self):
        counting[0] = False
        return health(self)
    monkeypatch.setattr(checkpoint.LogWindow, "record", record_then_count)
    monkeypatch.setattr(step_module.Step, "health", stop_counting)
    run_inproc("train.py", *TINY, f"--out_dir={tmp_path}", "--max_iters=40", "--log_interval=20", "--eval_interval=40",
               "--eval_at_start=False", *flags)
    assert len([r for r in read_log(tmp_path) if "loss" in r]) == 2
    assert counts == {}


def test_a_non_finite_step_is_skipped_on_the_device_and_reported_with_its_iteration():
    """A NaN gradient injected at step k: the fused AdamW skips that update (weights and moments unchanged),
    health() names iteration k with its loss and gradient norm, and the finite steps around it train."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=9))
    task = get_task("sort", num_digits=4)
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.99))
    stepper = step_module.Step(model, model, opt, MaskSpec(), grad_clip=1.0, start_iter=100)
    k, poison = 103, [False]
    model.lm_head.weight.register_hook(lambda g: g * math.nan if poison[0] else g)
    for it in range(100, 106):
        x0, eligible = task.batch(8, "train", gen(it))
        t = torch.rand(8, generator=gen(it))
        before = [p.detach().clone() for p in model.parameters()]
        poison[0] = it == k
        _, loss, grad_norm, _ = stepper(x0, eligible, t, torch.ones(8), None, 1e-2)
        same = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert same == (it == k) and all(p.isfinite().all() for p in model.parameters())
        assert (stepper.health() is None) == (it < k)
        if it == k:
            bad_loss = loss.item()
    assert stepper.health()[0] == k and stepper.health()[1] == pytest.approx(bad_loss)
    assert math.isnan(stepper.health()[2])


def _compiler_available():
    """torch.compile on CPU (inductor) needs dynamo, a C++ compiler and the Python headers."""
    return (torch._dynamo.is_dynamo_supported() and any(shutil.which(c) for c in ("g++", "c++", "clang++"))
            and os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))


@pytest.mark.skipif(not _compiler_available(), reason="torch.compile needs dynamo, a C++ compiler and Python.h")
@pytest.mark.e2e
def test_compiled_training_matches_eager(tmp_path):
    common = ["--max_iters=3", "--eval_interval=3", "--log_interval=1", "--learning_rate=1e-2", *TINY]
    eager = run("train.py", f"--out_dir={tmp_path / 'eager'}", *common)
    compiled = run("train.py", f"--out_dir={tmp_path / 'compiled'}", "--compile=True", *common)
    assert "compiling the loss" in compiled.stdout and "compiling" not in eager.stdout
    logged = lambda d: [(r["loss"], r["grad_norm"]) for r in read_log(tmp_path / d) if "loss" in r]
    assert len(logged("eager")) == 3
    np.testing.assert_allclose(logged("compiled"), logged("eager"), rtol=1e-4)


def torchrun(*args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(HERE, "train.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is needed")
@pytest.mark.e2e
def test_two_processes_train_like_one_on_the_same_global_batch_and_resume_in_one(tmp_path):
    """batch_size is the global batch: 2 processes x 2 accumulation steps of 4 x0 rows (MIRROR, StraTS, the EMA
    control variate on the gathered row losses) log the losses and gradient norms that 1 process computes on all
    16; only float rounding differs. Rank-dependent draws would change the very first loss, a wrong gradient
    scale the gradient norm. P-POTS fitted on rank 0 and broadcast samples what a single process samples (pair,
    with dropout; fit='none', the measured curve itself: from the ~1e-7 rounding that DDP's all-reduce leaves in
    the weights, the EPR fit's L-BFGS can land elsewhere on a flat KL valley, which moved the next loss by ~2e-5
    relative, past the 1e-5 this test allows): the same 4 micro-batches (1 process x 4 accumulation steps) draw the same dropout masks,
    which ranks sharing one RNG stream would not. The 2-process checkpoint resumes in 1 process."""
    common = [*TINY, "--max_iters=4", "--eval_interval=4", "--log_interval=1", "--lr_decay_iters=8",
              "--warmup_iters=0", "--learning_rate=1e-2"]
    runs = {"stratified": (["--masking=mirror", "--t_sampler=stratified", "--cv_bins=4"], 1),
            "ppots": (["--masking=pair", "--t_sampler=ppots", "--ppots_fit=none", "--ppots_fit_iter=2",
                       "--dropout=0.1"], 4)}
    for name, (flags, accumulation) in runs.items():
        one, two = tmp_path / f"{name}1", tmp_path / f"{name}2"
        run("train.py", f"--out_dir={one}", *common, *flags, f"--gradient_accumulation_steps={accumulation}",
            threads=1)  # as torchrun's processes
        proc = torchrun(f"--out_dir={two}", *common, *flags, "--gradient_accumulation_steps=2")
        assert proc.stdout.count("done in") == 1  # only rank 0 reports
        for a, b in zip(read_log(one), read_log(two), strict=True):
            assert a.keys() == b.keys() and a["iter"] == b["iter"]
            if "t_hist" in a:
                assert a["t_hist"] == b["t_hist"]
            for key in ("loss", "loss_raw", "grad_norm", "w_mean", "val_nats"):
                if key in a:
                    assert math.isclose(a[key], b[key], rel_tol=1e-5), (name, a, b)
    for d in ("stratified1", "stratified2"):
        run("train.py", f"--out_dir={tmp_path / d}", "--init_from=resume", "--max_iters=6")
    resumed = [[r.get("loss", r.get("val_nats")) for r in read_log(tmp_path / d)] for d in ("stratified1", "stratified2")]
    assert len(resumed[0]) == len(read_log(tmp_path / "stratified1")) and len(resumed[0]) > 6
    np.testing.assert_allclose(resumed[1], resumed[0], rtol=1e-5)


# ----------------------------------------------------------------------------- data.py, text.py and sample.py: shipped text, vocabulary, temperature, limits
CORPUS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TEXT = "the quick brown fox jumps over the lazy dog.\n" * 20


def random_model(vocab_size, block_size, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab_size, mask_id=vocab_size - 1, block_size=block_size,
                                   n_layer=1, n_head=2, n_embd=32)).eval()


def write_ckpt(out_dir, config, vocab_size, block_size, vocab=None):
    """A checkpoint as train.py writes one, as far as sample.py reads it: a tiny random model."""
    os.makedirs(out_dir, exist_ok=True)
    model = random_model(vocab_size, block_size)
    ckpt = {"model_args": asdict(model.config), "model": model.state_dict(),
            "config": {**train_config.defaults(), **config}}
    if vocab is not None:
        ckpt["vocab"] = vocab
    torch.save(ckpt, os.path.join(out_dir, "ckpt.pt"))
    return str(out_dir)


def text_ckpt(tmp_path, data_path, store_vocab=True, block_size=24):
    chars = sorted(set(TEXT))
    config = dict(task="text", data_path=str(data_path), block_size=block_size)
    return write_ckpt(tmp_path / "out", config, len(chars) + 1, block_size, chars if store_vocab else None)


def main_stdout(capsys, *argv):
    sample.main(list(argv))
    return capsys.readouterr().out


# ----------------------------------------------------------------------------- the shipped corpus
@pytest.mark.parametrize("preset", ["shakespeare_char.py", "shakespeare_char_cpu.py"])
def test_shipped_corpus_loads_through_the_preset_path_from_any_directory(preset, tmp_path, monkeypatch):
    source = open(os.path.join(HERE, "config", preset)).read()
    scope = {}
    exec(source, scope)
    assert scope["data_path"] == "data/tinyshakespeare.txt" and "shared" not in source
    assert hashlib.sha256(open(os.path.join(HERE, scope["data_path"]), "rb").read()).hexdigest() == CORPUS_SHA256
    monkeypatch.chdir(tmp_path)  # not the repository: found under the repository
    task = TextTask(scope["data_path"], scope["block_size"])
    assert len(task.chars) == 65 and task.decode(task.encode("ROMEO:")) == "ROMEO:"
    x0, eligible = task.batch(2, "val", torch.Generator().manual_seed(0))
    assert x0.shape == (2, scope["block_size"]) and eligible.all()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tinyshakespeare.txt").write_text(TEXT)  # the current directory comes first
    assert TextTask(scope["data_path"], 16).chars == sorted(set(TEXT))


# ----------------------------------------------------------------------------- stored vocabulary
def test_text_task_with_stored_chars_and_no_data_file_encodes_decodes_and_generates():
    chars = sorted(set(TEXT))
    task = TextTask("", block_size=24, chars=chars)
    assert task.chars == chars and (task.vocab_size, task.mask_id) == (len(chars) + 1, len(chars))
    assert task.decode(task.encode("lazy fox")) == "lazy fox"
    assert task.encode("a").item() == chars.index("a")
    with pytest.raises(ValueError, match="no data file"):
        task.batch(2, "train")
    with pytest.raises(ValueError, match="needs --data_path"):
        TextTask("", block_size=24)
    model = random_model(task.vocab_size, 24)
    out = text_sample(model, task, "the", 10, temperature=0.8, generator=torch.Generator().manual_seed(0))
    assert len(out) == 13 and out.startswith("the") and set(out) <= set(chars)


def test_sample_uses_the_stored_vocabulary_when_the_data_file_is_gone(tmp_path, capsys):
    data = tmp_path / "tiny.txt"
    data.write_text(TEXT)
    out = text_ckpt(tmp_path, data)
    assert main_stdout(capsys, f"--out_dir={out}", "--prompt=the", "--length=8", "--num_samples=1")
    data.unlink()
    printed = main_stdout(capsys, f"--out_dir={out}", "--prompt=the", "--length=8", "--num_samples=2")
    assert [ln[:3] for ln in printed.splitlines()[::2]] == ["the", "the"]
    old = text_ckpt(tmp_path, data, store_vocab=False)  # a checkpoint from before "vocab": needs the file
    with pytest.raises(ValueError, match="tiny.txt not found"):
        sample.main([f"--out_dir={old}"])


def test_a_data_file_with_a_different_vocabulary_is_refused(tmp_path):
    data = tmp_path / "tiny.txt"
    data.write_text(TEXT + "QZ!")
    with pytest.raises(ValueError, match=r"3 characters not in the stored vocabulary: '!QZ'"):
        TextTask(str(data), block_size=24, chars=sorted(set(TEXT)))
    out = text_ckpt(tmp_path, data)
    with pytest.raises(ValueError, match=r"does not have the checkpoint's vocabulary.*only in the file: '!QZ'"):
        sample.main([f"--out_dir={out}"])
    data.write_text(TEXT.replace("z", "s"))  # fewer characters than the checkpoint's differ too
    with pytest.raises(ValueError, match=r"only in the file: ''; only in the checkpoint: 'z'"):
        sample.main([f"--out_dir={out}"])


# ----------------------------------------------------------------------------- temperature
def test_text_samples_at_a_temperature_by_default_and_synthetic_tasks_stay_greedy(tmp_path, capsys):
    data = tmp_path / "tiny.txt"
    data.write_text(TEXT)
    out = text_ckpt(tmp_path, data)
    text = lambda *a: main_stdout(capsys, f"--out_dir={out}", "--length=16", "--num_samples=1", *a)
    assert text("--seed=1") != text("--seed=2")
    assert text("--seed=1", "--temperature=0") == text("--seed=2", "--temperature=0.0")
    sort = write_ckpt(tmp_path / "sort", dict(task="sort", num_digits=4, eval_problems=16), 13, 9)
    synthetic = lambda *a: main_stdout(capsys, f"--out_dir={sort}", *a)
    assert synthetic("--prompt=3141=", "--seed=1") == synthetic("--prompt=3141=", "--seed=2")
    accuracy_line = lambda *a: synthetic(*a).splitlines()[-1]
    assert "held-out exact match" in accuracy_line("--seed=1")
    assert accuracy_line("--seed=1") == accuracy_line("--seed=2", "--temperature=1.0")


# ----------------------------------------------------------------------------- synthetic limits
def _split_in_python(digits):
    """The split hash in exact integer arithmetic (no int64), for one problem's digits."""
    code = sum(d * 10 ** i for i, d in enumerate(digits))
    return (((code % 2147483647) * 2654435761) % 4294967291) % 1000 < 100


def test_sort_and_add_are_exact_and_well_split_at_the_largest_num_digits():
    g = torch.Generator().manual_seed(0)
    sort, add = SortTask(18), AddTask(9)
    for task, check in ((sort, lambda p, r: r == "".join(sorted(p[:-1]))),
                        (add, lambda p, r: int(r) == int(p[:9]) + int(p[10:19]) and len(r) == 10)):
        for split in ("train", "val"):
            x0, _ = task.batch(500, split, g)
            for row in x0:
                p, r = task.decode(row[:task.prompt_len]), task.decode(row[task.prompt_len:])
                assert check(p, r), (p, r)
                digits = [int(c) for c in p if c.isdigit()]
                assert _split_in_python(digits) == (split == "val"), p
    # Big sums and carries, not just random ones: 999999999 + 999999999 and friends.
    prompts = torch.stack([add.encode(f"{a:09d}+{b:09d}=") for a, b in
                           [(999999999, 999999999), (999999999, 1), (0, 0), (500000000, 500000000)]])
    assert [int(add.decode(r)) for r in add.response(prompts)] == [1999999998, 1000000000, 0, 1000000000]
    digits = torch.randint(0, 10, (20000, 18), generator=g)
    codes = (digits * 10 ** torch.arange(18)).sum(1)
    assert 0.09 < _in_val(codes).float().mean().item() < 0.11  # the split is not degenerate
    rows = random.Random(0).sample(range(20000), 200)
    assert all(_in_val(codes[i]).item() == _split_in_python(digits[i].tolist()) for i in rows)


def test_num_digits_beyond_int64_or_below_1_is_refused():
    assert 10 ** 18 - 1 <= torch.iinfo(torch.int64).max < 10 ** 19 - 1  # why 18 is the largest
    for name, largest in (("sort", 18), ("add", 9)):
        for bad in (0, -1, largest + 1, 2.0, True):
            with pytest.raises(ValueError, match=f"task={name} takes num_digits from 1 to {largest}"):
                get_task(name, num_digits=bad)
        task = get_task(name, num_digits=1)  # the smallest: both splits non-empty, so batch() ends
        g = torch.Generator().manual_seed(0)
        for split in ("train", "val"):
            x0, _ = task.batch(50, split, g)
            assert task.is_correct(x0[:, :task.prompt_len], x0[:, task.prompt_len:]).all()


@pytest.mark.parametrize("num_digits,bad,expected", [
    (3, "3+14159=", "123+456= (3 digits, '+', 3 digits, '=')"),
    (3, "123+45=6", "123+456= (3 digits, '+', 3 digits, '=')"),
    (3, "123=456+", "123+456= (3 digits, '+', 3 digits, '=')"),
    (3, "12a+456=", "123+456= (3 digits, '+', 3 digits, '=')"),
    (3, "123+456", "123+456= (3 digits, '+', 3 digits, '=')"),
    (None, "3141=926", "12345678= (8 digits, '=')"),
    (None, "3141+926=", "12345678= (8 digits, '=')"),
    (None, "31415926", "12345678= (8 digits, '=')"),
])
def test_a_prompt_with_the_wrong_layout_is_refused_showing_the_layout(num_digits, bad, expected):
    task = AddTask(num_digits) if num_digits else SortTask(8)
    good = "123+456=" if num_digits else "31415926="
    assert task.decode(task.encode(good)) == good
    with pytest.raises(ValueError) as e:
        task.encode(bad)
    assert repr(bad) in str(e.value) and expected in str(e.value)


def test_an_unreadable_data_file_is_one_clear_error(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be\n" * 50)

    def denied(*args, **kw):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(ValueError, match="cannot read data file .*corpus.txt: Permission denied"):
        TextTask(str(corpus), block_size=8)


def test_text_block_size_below_2_is_refused():
    for bad in (1, 0):
        with pytest.raises(ValueError, match="block_size >= 2.*no next-token target"):
            TextTask("", block_size=bad, chars=list("ab"))
    assert TextTask("", block_size=2, chars=list("ab")).block_size == 2


# ----------------------------------------------------------------------------- generation and flags
def test_generate_rejects_a_bad_block_length_steps_temperature_or_remasking():
    task = SortTask(4)
    model = random_model(13, 9)
    prompt = task.prompts(2, "val", torch.Generator().manual_seed(0))
    assert not (generate(model, prompt, 4, steps=None, block_length=None) == task.mask_id).any()
    for kw, words in ((dict(block_length=0), "block_length must be > 0"),
                      (dict(block_length=-2), "block_length must be > 0"),
                      (dict(steps=0), "steps must be > 0"), (dict(steps=-1), "steps must be > 0"),
                      (dict(temperature=-0.1), "temperature must be >= 0"),
                      (dict(remasking="greedy"), "unknown remasking")):
        with pytest.raises(ValueError, match=words):
            generate(model, prompt, 4, **kw)


@pytest.mark.parametrize("flag,words", [
    ("--block_length=-1", "--block_length must be >= 0"), ("--steps=-1", "--steps must be >= 0"),
    ("--num_samples=0", "--num_samples must be > 0"), ("--length=0", "--length must be > 0"),
    ("--temperature=-0.5", "--temperature must be a number >= 0"),
    ("--temperature=hot", "--temperature must be a number >= 0"),
    ("--remasking=greedy", "unknown --remasking=greedy"),
])
def test_sample_refuses_a_meaningless_flag_before_any_work(flag, words, tmp_path):
    # out_dir has no checkpoint: the flag must be refused before sample.py looks for one
    with pytest.raises(ValueError, match=words):
        sample.main([f"--out_dir={tmp_path}", flag])


@pytest.mark.e2e
def test_sample_script_turns_a_bad_flag_into_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), f"--out_dir={tmp_path}", "--steps=-1"],
                          capture_output=True, text=True, cwd=HERE, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
    assert "--steps must be >= 0" in lines[0]


# ----------------------------------------------------------------------------- variance.py and samplers.py: StraTS, the P-POTS tail and support, kept draws
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
    sampler = PPOTS(T_GRID, synthetic_sqrt_m(T_GRID), fit="none")
    ours, best = second_moments(sampler)  # fit='none' follows √m, so it attains the optimum
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
    sampler = PPOTS(T_GRID, synthetic_sqrt_m(T_GRID), fit="none")
    u = (torch.arange(0, 58, dtype=torch.float64) + 0.5) / 4096  # cells below t_1 = 1/70
    ratio = sampler.density(u) / synthetic_sqrt_m(u)
    assert (ratio / ratio.mean() - 1).abs().max() < 1e-2


# ----------------------------------------------------------------------------- support='grid'
EPR = dict(a=2.0, b=0.5, c=0.3, kappa=1.5, r=1.2, q=3.0, n=2.5)


@pytest.mark.parametrize("fit", ["none", "epr"])
def test_grid_support_never_leaves_the_grid_and_estimates_the_truncated_integral(fit):
    """support='grid' (the paper's released sampler): t only in [t_1, t_{T-1}], w = 1/p normalised
    there, so E[w f] = int_{t_1}^{t_{T-1}} f: BIASED for [0, 1] (f = t^2: 0.3192 against 1/3,
    ~20 SE at N = 200,000), within 4 SE of the truncated integral."""
    curve = epr_log_density(T_GRID, **{k: torch.tensor(v, dtype=torch.float64)
                                      for k, v in EPR.items()}).exp()
    sampler = PPOTS(T_GRID, curve, fit=fit, support="grid")
    t, w = sampler.sample(N, gen(0))
    assert t.double().min() >= T_GRID[0] and t.double().max() <= T_GRID[-1]
    assert t.double().min() < T_GRID[0] + 1e-3 and t.double().max() > T_GRID[-1] - 1e-3
    y = w.double() * t.double() ** 2
    mean, se = y.mean().item(), y.std().item() / math.sqrt(N)
    lo, hi = T_GRID[0].item(), T_GRID[-1].item()
    assert abs(mean - (hi ** 3 - lo ** 3) / 3) < 4 * se
    assert abs(mean - 1 / 3) > 4 * se
    assert "BIASED" in describe_fit(sampler)
    assert sampler_from_state(sampler.state_dict()).support == "grid"


# ----------------------------------------------------------------------------- seams and the lab
@pytest.mark.parametrize("path, behind", [
    ("samplers.py", {"OnlinePPOTS", "observe", "second_moments", "describe_fit"}),
    ("masking.py", {"SupplementarySpec", "isad_rates", "syrm_loss", "mask_spec_from_config"})])
def test_core_never_uses_what_is_behind_the_seam(path, behind):
    """No code above a file's `behind the seam` line names a function, class or method defined
    only below it (docstrings and comments aside): the core runs without the extras."""
    source = open(os.path.join(HERE, path)).read()
    seam = next(i for i, line in enumerate(source.splitlines(), 1)
                if line.startswith("# -") and "behind the seam" in line)
    top = ast.parse(source).body
    defined = lambda nodes: {n.name for top_node in nodes for n in ast.walk(top_node)
                             if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    core = [n for n in top if n.lineno < seam]
    extras = defined([n for n in top if n.lineno > seam]) - defined(core)
    used = {n.id if isinstance(n, ast.Name) else n.attr for top_node in core for n in ast.walk(top_node)
            if isinstance(n, (ast.Name, ast.Attribute))}
    assert behind <= extras and not extras & used


def test_no_root_file_imports_the_lab():
    """The reference runs without lab/: no .py file at the root imports it (this file included)."""
    for path in Path(HERE).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "lab" or n.startswith("lab.") for n in names), path.name


# ----------------------------------------------------------------------------- kept draws
def test_curve_and_measure_with_the_same_seed_see_the_same_x0s():
    """The variance table (lab) pairs P-POTS's measured total with the floor from a curve on the
    same x0s: both draw their x0s first from the generator. An ARM's loss is a function of x0
    alone, so the two draw arrays must agree x0 by x0."""
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


# ----------------------------------------------------------------------------- the SFT regime: tasks, finite set, fine-tuning
def test_twosort_writes_the_digits_ascending_then_descending():
    task = get_task("twosort", num_digits=12)
    assert (task.response_len, task.seq_len, task.vocab_size) == (25, 38, 15)
    x0, eligible = task.batch(300, "train", torch.Generator().manual_seed(0))
    for row in x0:
        prompt, answer = task.decode(row).split("=")
        assert answer == "".join(sorted(prompt)) + "|" + "".join(sorted(prompt, reverse=True))
    assert not eligible[:, :task.prompt_len].any() and eligible[:, task.prompt_len:].all()


def test_mix_rows_are_correct_problems_padded_with_eligible_dots():
    task = get_task("mix", num_digits=12)
    x0, eligible = task.batch(600, "val", torch.Generator().manual_seed(1))
    kinds = set()
    for row, elig in zip(x0, eligible):
        prompt, answer = task.decode(row).split("=", 1)
        answer = answer.rstrip(".")
        assert "." not in answer
        assert elig.tolist() == [False] * (len(prompt) + 1) + [True] * (38 - len(prompt) - 1)
        if "+" in prompt:
            kinds.add("add")
            a, b = prompt.split("+")
            assert int(answer) == int(a) + int(b) and len(answer) == len(a) + 1
        else:
            kinds.add("twosort")
            assert answer == "".join(sorted(prompt)) + "|" + "".join(sorted(prompt, reverse=True))
    assert kinds == {"twosort", "add"}


def test_a_finite_set_gives_every_example_once_per_epoch_the_same_set_for_every_seed():
    task = get_task("twosort", num_digits=6)
    torch.manual_seed(123)
    one = finetune.FiniteTrainSet(task, 50)
    torch.manual_seed(456)
    two = finetune.FiniteTrainSet(task, 50)
    assert torch.equal(one.x0, two.x0)  # drawn with TRAIN_SET_SEED, not the run's RNG
    pool = sorted(map(tuple, one.x0.tolist()))
    assert len(set(pool)) == 50
    g, side = torch.Generator().manual_seed(0), torch.Generator().manual_seed(5)
    seen = []
    for _ in range(22):  # 154 rows: 3 epochs + 4; other readers of the set in between
        seen.append(one.next_batch(7, g)[0])
        assert set(map(tuple, one.batch(5, "train", side)[0].tolist())) <= set(pool)
    seen = torch.cat(seen)
    for e in range(3):
        assert sorted(map(tuple, seen[50 * e:50 * (e + 1)].tolist())) == pool
    assert one.epoch == pytest.approx(154 / 50)
    assert not torch.equal(seen[:50], seen[50:100])  # reshuffled per epoch
    assert not torch.equal(two.next_batch(7, torch.Generator().manual_seed(1))[0], seen[:7])
    val = {tuple(r) for r in one.batch(2000, "val", g)[0].tolist()}
    assert not val & set(pool)  # held-out problems are never in the set
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in one.state_dict().items()}
    g_state = g.get_state()
    ahead = torch.cat([one.next_batch(9, g)[0] for _ in range(8)])
    one.load_state_dict(state)
    g.set_state(g_state)
    assert torch.equal(torch.cat([one.next_batch(9, g)[0] for _ in range(8)]), ahead)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny MDM pretrained on mix for 3 steps (4-digit layout: T = 24)."""
    out = tmp_path_factory.mktemp("pretrained")
    run("train.py", f"--out_dir={out}", "--task=mix", "--max_iters=3", "--eval_interval=3",
        *(f for f in TINY if not f.startswith("--eval_problems")))
    return out / "ckpt.pt"


SFT_FLAGS = ["--task=twosort", "--num_digits=4", "--train_size=40", "--batch_size=8", "--eval_problems=16",
             "--eval_iters=1", "--variance_interval=0", "--log_interval=1", "--warmup_iters=0",
             "--lr_schedule=linear", "--min_lr=0"]


@pytest.mark.e2e
def test_fine_tuning_starts_from_the_checkpoint_weights_in_its_shape(pretrained, tmp_path):
    argv = sys.argv
    sys.argv = ["train.py", f"--init_from={pretrained}", f"--out_dir={tmp_path}", "--max_iters=0",
                "--eval_at_start=False", "--eval_problems_mid=4", *SFT_FLAGS]
    try:
        g = runpy.run_path(os.path.join(HERE, "train.py"), run_name="__main__")
    finally:
        sys.argv, sys.excepthook = argv, sys.__excepthook__
    ckpt = torch.load(pretrained, weights_only=True)
    state = g["model"].state_dict()
    assert state.keys() == ckpt["model"].keys()
    assert all(torch.equal(state[k], ckpt["model"][k]) for k in state)
    assert (g["n_layer"], g["n_embd"], g["model_type"]) == (1, 32, "mdm")  # the checkpoint's shape
    assert g["dataset"].epoch == 0 and len(g["dataset"].x0) == 40
    # max_iters=0: iteration 0 is the last evaluation, so it runs, on all eval_problems
    assert [(r["iter"], r["problems"]) for r in read_log(tmp_path) if "acc" in r] == [(0, 16)]


@pytest.mark.e2e
def test_fine_tuning_on_a_finite_set_logs_epochs_and_clipping_and_resumes_bit_exactly(pretrained, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    common = [f"--init_from={pretrained}", "--eval_interval=3", "--grad_clip=0.5", "--lr_decay_iters=8",
              "--eval_at_start=False", "--eval_problems_mid=4", *SFT_FLAGS]
    run("train.py", f"--out_dir={full}", "--max_iters=8", *common)
    run("train.py", f"--out_dir={part}", "--max_iters=4", *common)
    run("train.py", f"--out_dir={part}", "--max_iters=8", "--init_from=resume")
    steps = lambda d: [(r["iter"], r["loss"], r["epoch"], r["clip_frac"]) for r in read_log(d) if "loss" in r]
    assert steps(part) == steps(full) and len(steps(full)) == 8
    evals = lambda d: [(r["iter"], r["problems"], r["acc"]) for r in read_log(d) if "acc" in r]
    assert [e[:2] for e in evals(full)] == [(3, 4), (6, 4), (8, 16)]  # the last on all problems
    assert [e for e in evals(part) if e[0] != 4] == evals(full)  # 4: the first call's last
    assert [s[2] for s in steps(full)] == [8 * i / 40 for i in range(1, 9)]
    assert all(s[3] in (0.0, 1.0) for s in steps(full))
    lrs = [r["lr"] for r in read_log(full) if "lr" in r]  # linear from 2e-3 to min_lr=0 at step 8
    assert lrs == pytest.approx([2e-3 * (1 - i / 8) for i in range(8)])
    assert any(s[3] == 1.0 for s in steps(full))  # a fresh head on new data: norms above 0.5
