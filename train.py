"""Train a masked diffusion model (or its ARM baseline), nanoGPT style.

    python train.py                                   # sort 8 digits: ~80 s on 2 CPU cores
    python train.py config/some_preset.py --key=value # any global below can be overridden
    python train.py --t_sampler=ppots --masking=mirror
    python train.py --init_from=resume --out_dir=out  # continue; the checkpoint's config is
                                                        the base
    python train.py --init_from=pre/ckpt.pt --task=twosort --train_size=2000  # fine-tune (SFT)
    torchrun --standalone --nproc_per_node=2 train.py  # DDP: the same run (same global batch)
                                                         on 2 processes

One step: x0 ~ task, (t, w) ~ sampler, masks ~ MaskSpec, loss = mean_rows(w * l) with
l = masking.row_losses (the mean of the two views for mirror/pair) -> backward -> AdamW.

The global batch (the one statement of the argument). batch_size is the GLOBAL batch. Every rank
draws the step's whole batch (x0, t, w, masks) from the same seeded streams and trains on its own
rows of it, split again into gradient_accumulation_steps micro-batches; DDP averages the
gradients. So 1 process, N processes or N accumulation steps run the same estimator on the same
numbers (up to float rounding; with dropout, for the same micro-batches): a StraTS batch is
stratified across ranks, and a checkpoint resumes under any world size. Only rank 0 evaluates,
logs, saves, measures variance and fits P-POTS (whose fitted state it broadcasts).

Bad input: the whole configuration is checked before anything in out_dir is touched; a non-finite
loss or gradient norm stops the run with one line naming the iteration, before the update; what
resume accepts and what the run directory guarantees is in checkpoint.py.
"""
import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import figures
import variance
from checkpoint import (append_log, finetune_config, load_checkpoint, lock_out_dir,
                        resumed_config, rng_state, save_checkpoint, set_rng_state, start_log)
from configurator import check_ranges, configure_globals, given_keys, report_errors
from control_variate import LossControlVariate
from data import task_from_checkpoint, task_from_config
from finetune import check_fits, training_set
from masking import MODES, MaskSpec, draw_masks, mask_spec_from_config, row_losses
from model import ModelConfig, Transformer, device_and_dtype, weight_ema
from sample import TEXT_TEMPERATURE, accuracy, text_sample
from samplers import SAMPLERS, build_ppots, make_sampler, sampler_from_state

report_errors()  # bad input: one `error:` line (configurator.py)
# -----------------------------------------------------------------------------
# I/O
out_dir = "out"
eval_interval = 200
eval_iters = 4  # val batches for the ELBO
eval_problems = 512  # held-out prompts for exact-match accuracy (synthetic tasks), last evaluation
eval_problems_mid = 0  # the same at the evaluations before the last (0 = eval_problems)
eval_at_start = True  # evaluate before the first step of a fresh run (iteration 0)
log_interval = 10
# 'scratch', 'resume' (the checkpoint's config is the base; see checkpoint.py) or a checkpoint's
# path: fine-tune its (evaluated) weights, with its shape and vocabulary; fresh optimizer,
# sampler, iteration count and log
init_from = "scratch"
seed = 1337
# data
task = "sort"  # sort | add | twosort | mix (data.py) | text (text.py)
num_digits = 8  # sort, twosort: how many digits; add: per operand; mix: pads to twosort
# > 0: a finite training set of this many examples, visited in epochs (finetune.FiniteTrainSet);
# 0 = fresh examples every step
train_size = 0
data_path = ""  # task=text: any UTF-8 file
block_size = 256  # task=text: sequence length (synthetic tasks fix their own)
batch_size = 128  # forward rows per step, over all processes (the global batch)
# micro-batches per process per step (memory only: the estimator is unchanged)
gradient_accumulation_steps = 1
sample_length = 256  # task=text: characters generated at the end of training
sample_prompt = ""  # task=text: also generate after this prompt
sample_block_length = 32  # task=text: semi-autoregressive blocks of this many characters
# model
model_type = "mdm"  # mdm (bidirectional) | arm (causal, next-token loss)
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
bias = False
# method: the t-law and the masking mode
t_sampler = "uniform"  # uniform | stratified | clipped | ppots
masking = "standard"  # standard | mirror | pair
matched_compute = True  # mirror/pair: batch_size/2 clean rows, so forward rows equal standard's
ppots_fit_iter = 100  # P-POTS: uniform t until this iter, then measure + fit on the current model
ppots_refit_every = 0  # 0 = fit once (the paper); N = refit every N iters
ppots_online = False  # refit from the training losses already computed (no extra forwards)
# epr (7-parameter family, fitted by KL) | none (the measured curve, piecewise linear)
ppots_fit = "epr"
# full: t on [0, 1] (unbiased) | grid: only the measured range (the released code; biased)
ppots_support = "full"
# supplementary methods (masking.py, control_variate.py, model.py); all off by default
# ISAD: none | default (the task's hardest tokens, data.py) | first (first response token)
isad_tokens = "none"
# ISAD: the critical tokens are masked with q = min(1, p + isad_delta), weighted 1/q
isad_delta = 0.2
# SyRM: 1 = off; < 1 also masks the prompt's syntax, loss a L_resp + (1 - a) L_syntax
syrm_alpha = 1.0
# the paper's EMA control variate on the reported loss (gradient unchanged): 0 = off, else bins of t
cv_bins = 0
cv_eta = 0.01  # its EMA rate (the paper's code: 0.001 .. 0.1)
# weight averaging, evaluated and saved as 'ema': 0 = off (MDLM: 0.9999; 1000 iters: 0.99)
weight_ema_decay = 0.0
# variance logging (variance.py): A, B, C of the loss and of the gradient
variance_interval = 200  # 0 = off
variance_n_x0 = 16
variance_n_t = 4
variance_n_masks = 2
variance_grad_n_x0 = 4
# optimiser: AdamW, linear warmup then cosine (lr_schedule) decay to min_lr
learning_rate = 2e-3
max_iters = 1000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
# max gradient norm; 0 = no clipping (the norm before clipping is logged either way)
grad_clip = 1.0
warmup_iters = 100
lr_decay_iters = 0  # 0 = max_iters
min_lr = 2e-4
lr_schedule = "cosine"  # cosine | linear: the decay from learning_rate to min_lr after warmup
# system
device = ""  # '' = auto: cuda > mps > cpu (under torchrun, cuda:LOCAL_RANK)
# '' = auto: bfloat16 on GPUs with native bf16, float16 + GradScaler on older ones,
# float32 elsewhere
dtype = ""
compile = False
# -----------------------------------------------------------------------------
config = configure_globals(globals())
ddp = "RANK" in os.environ  # started by torchrun
rank, local_rank, world_size = (int(os.environ.get(k, d))
                                for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
master = rank == 0  # evaluates, logs, saves, measures variance, fits P-POTS
ckpt_path = os.path.join(out_dir, "ckpt.pt")
ckpt = pretrained = None
if init_from == "resume":
    model, ckpt = load_checkpoint(ckpt_path, raw=True)
    config = resumed_config(config, ckpt, given_keys(sys.argv[1:]))
    globals().update(config)
    if max_iters <= ckpt["iter_num"]:
        raise ValueError(f"the checkpoint is at iteration {ckpt['iter_num']}: "
                         f"--max_iters={max_iters} leaves nothing to train (raise it to continue)")
elif init_from != "scratch":  # a path: fine-tune its weights, in its shape
    if not os.path.isfile(init_from):
        raise ValueError(f"--init_from must be 'scratch', 'resume' or a checkpoint's path; "
                         f"{init_from!r} is none of them")
    base, pretrained = load_checkpoint(init_from)
    config = finetune_config(config, pretrained, given_keys(sys.argv[1:]), init_from)
    globals().update(config)
# ------------------------------------------------------------ every check before out_dir is touched
check_ranges(config, {
    "batch_size": (1, None), "gradient_accumulation_steps": (1, None), "max_iters": (0, None),
    "eval_interval": (1, None), "eval_iters": (1, None), "eval_problems": (1, None),
    "eval_problems_mid": (0, None), "log_interval": (1, None), "num_digits": (1, None),
    "n_layer": (1, None), "n_head": (1, None), "n_embd": (1, None), "dropout": (0.0, 0.99),
    "warmup_iters": (0, None), "lr_decay_iters": (0, None), "min_lr": (0.0, None),
    "weight_decay": (0.0, None), "beta1": (0.0, 0.9999), "beta2": (0.0, 0.9999),
    "grad_clip": (0.0, None), "ppots_fit_iter": (0, None), "ppots_refit_every": (0, None),
    "cv_bins": (0, None), "variance_interval": (0, None), "variance_n_x0": (2, None),
    "variance_n_t": (2, None), "variance_n_masks": (2, None), "variance_grad_n_x0": (2, None),
    "sample_length": (0, None), "sample_block_length": (1, None), "train_size": (0, None)})
for key, allowed in (("model_type", ("mdm", "arm")),
                     ("t_sampler", SAMPLERS),
                     ("masking", MODES),
                     ("ppots_fit", ("epr", "none")), ("ppots_support", ("full", "grid")),
                     ("lr_schedule", ("cosine", "linear")),
                     ("isad_tokens", ("none", "default", "first"))):
    if config[key] not in allowed:
        raise ValueError(f"unknown --{key}={config[key]}; choose from {', '.join(allowed)}")
if not learning_rate > 0 or min_lr > learning_rate:
    raise ValueError(f"need 0 < min_lr <= learning_rate, got learning_rate={learning_rate}, "
                     f"min_lr={min_lr}")
if n_embd % n_head:
    raise ValueError(f"--n_head={n_head} does not divide --n_embd={n_embd}")
if model_type == "arm" and (masking != "standard" or t_sampler != "uniform" or isad_tokens != "none"
                            or syrm_alpha != 1):
    raise ValueError("an ARM has no masking rate and masks nothing: use --masking, --t_sampler, "
                     "ISAD and SyRM with --model_type=mdm")
if ppots_online and not (t_sampler == "ppots" and ppots_refit_every):
    raise ValueError("--ppots_online=True refits from training losses: it needs "
                     "--t_sampler=ppots and --ppots_refit_every > 0")
two_views = masking in ("mirror", "pair")
if two_views and matched_compute and batch_size % 2:
    raise ValueError(f"--masking={masking} with matched_compute runs batch_size/2 clean rows, "
                     f"each twice: --batch_size={batch_size} must be even")
rows = batch_size // 2 if two_views and matched_compute else batch_size  # clean rows per step
if rows % (world_size * gradient_accumulation_steps):
    raise ValueError(f"{rows} clean rows per step do not split into {world_size} processes x "
                     f"{gradient_accumulation_steps} accumulation steps: choose batch_size and "
                     f"gradient_accumulation_steps so they do")
micro_rows = rows // (world_size * gradient_accumulation_steps)
if ddp and (device.startswith("cuda") or not device and torch.cuda.is_available()):
    device = f"cuda:{local_rank}"  # one GPU per process, chosen before anything touches CUDA
    torch.cuda.set_device(device)
device, device_type, ptdtype, ctx = device_and_dtype(device, dtype)
# the config keeps 0, so a resumed run with more iters decays to them
decay_iters = lr_decay_iters or max_iters
config = {k: globals()[k] for k in config}

# init, t and masks: the same seed on every rank, which trains on its own rows
torch.manual_seed(seed)
# the x0 stream has its own generator (offset from the global one), so methods with the same rows
# per step see the same training examples for a seed, however many random numbers their
# t/masks consume
data_gen = torch.Generator().manual_seed(seed + 1_000_003)
random.seed(seed)  # python and numpy draw nothing here; seeded (and checkpointed) for forks that do
np.random.seed(seed)
task_data = task_from_config(config) if ckpt is None else \
    task_from_checkpoint(dict(ckpt, config=config), True)
if pretrained is not None:
    check_fits(task_data, task, pretrained, init_from)
dataset = training_set(config, task_data)  # the task, or its finite training set
mask_spec = mask_spec_from_config(config, dataset)  # the masking mode with its ISAD / SyRM options
if pretrained is not None:  # its weights, this run's dropout
    model = Transformer(ModelConfig(**dict(pretrained["model_args"], dropout=dropout)))
    model.load_state_dict(base.state_dict())
elif ckpt is None:
    model = Transformer(ModelConfig(vocab_size=dataset.vocab_size, mask_id=dataset.mask_id,
                                    block_size=dataset.seq_len, n_layer=n_layer, n_head=n_head,
                                    n_embd=n_embd, dropout=dropout, bias=bias,
                                    causal=model_type == "arm"))
model.to(device).train()
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)
sampler = make_sampler("uniform" if t_sampler == "ppots" else t_sampler)
ema = weight_ema(model, weight_ema_decay) if weight_ema_decay else None
# what estimate_val, accuracy and the checkpoint's users see
eval_model = model if ema is None else ema.module
loss_cv = LossControlVariate(cv_bins, cv_eta) if cv_bins else None
iter_num = 0
if ckpt is not None:
    optimizer.load_state_dict(ckpt["optimizer"])
    # the saved state carries the old hyperparameters: use this run's
    for group in optimizer.param_groups:
        group.update(betas=(beta1, beta2),
                     weight_decay=weight_decay if group["weight_decay"] else 0.0)
    if ema is not None and "ema" in ckpt:
        ema.module.load_state_dict(ckpt["ema"])
        ema.n_averaged.copy_(ckpt["ema_n"])
    if loss_cv is not None and "loss_cv" in ckpt:
        loss_cv.load_state_dict(ckpt["loss_cv"])
    iter_num = ckpt["iter_num"]
    sampler = sampler_from_state(ckpt["sampler"])
    set_rng_state(ckpt["rng"], data_gen)
    if train_size:
        dataset.load_state_dict(ckpt["train_set"])
# ------------------------------------------------------------ the input is good: now out_dir
log_path = os.path.join(out_dir, "log.jsonl")
if master:
    lock = lock_out_dir(out_dir)  # held until the process ends
    start_log(log_path, None if ckpt is None else iter_num)
    print("config:", json.dumps(config))
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, "
          f"{'causal (ARM)' if model.config.causal else 'bidirectional (MDM)'}")
if ddp:
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
train_model = DDP(model,
                  device_ids=[local_rank] if device_type == "cuda" else None) if ddp else model
if compile:  # after DDP, as torch's docs advise, so that compile sees DDP's gradient buckets
    if master:
        print("compiling the training step: the first steps are slow")
    train_model = torch.compile(train_model)


def log(record):
    append_log(log_path, record)


def get_lr(it):
    """Linear warmup, then cosine (or linear) decay from learning_rate to min_lr at
    decay_iters."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    left = 1.0 - ratio if lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * ratio))
    return min_lr + left * (learning_rate - min_lr)


@torch.no_grad()
def estimate_val():
    """Val negative ELBO in nats per maskable token (a char for task=text): a fixed stratified
    t-grid (midpoints of batch_size strata), fixed data and masks (own generators), so the same
    weights give the same number, directly comparable with an ARM's val loss: its next-token
    cross-entropy per response token. Always the standard MDM objective, whatever ISAD/SyRM train
    on; with weight_ema_decay > 0, of the EMA weights."""
    eval_model.eval()
    g = torch.Generator().manual_seed(1234)
    t = ((torch.arange(batch_size) + 0.5) / batch_size).to(device)
    total = 0.0
    for _ in range(eval_iters):
        x0, eligible = (z.to(device) for z in dataset.batch(batch_size, "val", g))
        with ctx:
            total += row_losses(eval_model, x0, eligible, t, MaskSpec(), g).mean().item()
    model.train()
    return total / eval_iters


def evaluate():
    val_nats = estimate_val()
    if not math.isfinite(val_nats):
        raise ValueError(f"iteration {iter_num}: the val ELBO is {val_nats}; nothing was saved")
    record = {"iter": iter_num, "val_nats": val_nats, "val_bits": val_nats / math.log(2)}
    if hasattr(dataset, "prompts"):
        n = eval_problems if iter_num == max_iters else eval_problems_mid or eval_problems
        record.update(acc=accuracy(eval_model, dataset, n), problems=n)
    log(record)
    acc = f" | held-out exact match {record['acc']:.3f}" if "acc" in record else ""
    tqdm.write(f"iter {iter_num}: val {val_nats:.4f} nats/token = {record['val_bits']:.4f} "
               f"bits/token{acc}")
    return record


def checkpoint():
    """Everything a resume needs, plain types and tensors only; written by
    checkpoint.save_checkpoint."""
    state = {"model_args": asdict(model.config), "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "iter_num": iter_num, "config": config,
             "sampler": sampler.state_dict(), "rng": rng_state(data_gen)}
    if ema is not None:
        state.update(ema=ema.module.state_dict(), ema_n=ema.n_averaged)
    if loss_cv is not None:
        state["loss_cv"] = loss_cv.state_dict()
    if hasattr(dataset, "chars"):  # text: the vocabulary, so sampling does not need the data file
        state["vocab"] = dataset.chars
    if train_size:
        state["train_set"] = dataset.state_dict()
    save_checkpoint(ckpt_path, state, model)


def log_variance():
    start, g = time.time(), torch.Generator().manual_seed(seed + iter_num)
    kw = dict(n_t=variance_n_t, n_masks=variance_n_masks, generator=g, batch_size=rows,
              n_batches=16)
    res = {"iter": iter_num,
           "loss": variance.measure(model, dataset, sampler, mask_spec, variance_n_x0,
                                    target="loss", **kw),
           "grad": variance.measure(model, dataset, sampler, mask_spec, variance_grad_n_x0,
                                    target="grad", **kw)}
    model.train()
    tqdm.write(variance.format_line(iter_num, res["loss"], res["grad"]))
    log({"iter": iter_num, "variance": res, "seconds": time.time() - start})


@contextmanager
def own_dropout_rng(k):
    """With dropout: the forward of the step's global micro-batch k draws its dropout masks from the
    seed (seed, iter_num, k) in a forked RNG, so ranks never share dropout masks and the t / mask
    streams do not depend on how the batch is split. Without dropout nothing is drawn, and nothing
    is forked."""
    with torch.random.fork_rng(
            devices=[] if device_type == "cpu" else [torch.device(device).index or 0],
            enabled=dropout > 0):
        if dropout > 0:
            torch.manual_seed(hash((seed, iter_num, k)))
        yield


def gather_rows(local):
    """The per-row values of the whole global batch, in row order, from each rank's
    contiguous share."""
    if not ddp:
        return local
    shares = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(shares, local)
    return torch.cat(shares)


def finish():
    """Rank 0, after the last step: plots, text samples, and the one-line summary."""
    figures.plot_training(log_path, os.path.join(out_dir, "train.png"),
                          f"{model_type} {t_sampler}/{masking}")
    variance_records = [json.loads(line)["variance"] for line in open(log_path)
                        if '"variance"' in line]
    if variance_records:
        figures.plot_variance(variance_records, os.path.join(out_dir, "variance.png"))
    final = [json.loads(line) for line in open(log_path) if "val_bits" in line][-1]
    acc = f" | held-out exact match {final['acc']:.3f} ({eval_problems} problems)" \
        if "acc" in final else ""
    if task == "text":  # show what the model writes
        for prompt in ("", sample_prompt) if sample_prompt else ("",):
            print(f"--- sample{f' after {prompt!r}' if prompt else ''} "
                  f"({sample_block_length}-char blocks, temperature {TEXT_TEMPERATURE}):")
            print(text_sample(eval_model, dataset, prompt, sample_length,
                              block_length=sample_block_length, temperature=TEXT_TEMPERATURE,
                              generator=torch.Generator(device).manual_seed(seed)))
    print(f"done in {time.time() - t0:.0f}s: val {final['val_nats']:.4f} nats/token = "
          f"{final['val_bits']:.4f} bits/token{acc}")


t_seen, w_seen, loss_sum, norm_sum, raw_sum, t0 = [], [], 0.0, 0.0, 0.0, time.time()
n_clipped = 0  # steps in the log window whose norm before clipping exceeded grad_clip
start_iter = iter_num
bar = tqdm(total=max_iters, initial=iter_num, dynamic_ncols=True, disable=not master)
while True:
    since_fit = iter_num - ppots_fit_iter
    if t_sampler == "ppots" and iter_num < max_iters and (
            since_fit == 0
            or since_fit > 0 and ppots_refit_every and since_fit % ppots_refit_every == 0):
        if master and ppots_online and since_fit > 0:
            sampler.refit_online()
        elif master:
            sampler = build_ppots(model, dataset, mask_spec,
                                  generator=torch.Generator().manual_seed(seed + iter_num),
                                  fit=ppots_fit, support=ppots_support)
            model.train()
        if ddp:  # rank 0 measured and fitted; every rank samples t from its fit
            state = [sampler.state_dict()]
            dist.broadcast_object_list(state, src=0)
            sampler = sampler_from_state(state[0])
        if master:
            figures.plot_ppots(sampler, os.path.join(out_dir, "ppots.png"))
            tqdm.write(f"iter {iter_num}: P-POTS {sampler.describe()}")
    if master and (iter_num % eval_interval == 0 and iter_num > start_iter
                   or iter_num == max_iters or iter_num == 0 and eval_at_start):
        evaluate()
        if iter_num > start_iter:
            checkpoint()
    if master and variance_interval and iter_num % variance_interval == 0 and (
            iter_num > start_iter or iter_num == 0):
        log_variance()
    if iter_num >= max_iters:
        break
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr
    # the global batch, the same on every rank (mirror/pair: the first half of the x0 rows)
    # unlimited data: mirror/pair at matched compute see the first half of Standard's x0 rows;
    # a finite set hands out each example once per epoch, so it is asked for the rows it trains
    x0, eligible = (z[:rows].to(device) for z in (
        dataset.next_batch(rows, data_gen) if train_size
        else dataset.batch(batch_size, "train", data_gen)))
    t_cpu, w_cpu = sampler.sample(rows)
    t, w = t_cpu.to(device), w_cpu.to(device)
    masks = draw_masks(eligible, t, mask_spec) if model_type == "mdm" else None
    parts = []  # this rank's row losses, micro-batch by micro-batch
    for micro in range(gradient_accumulation_steps):
        # this micro-batch's index in the global batch
        k = rank * gradient_accumulation_steps + micro
        mb = slice(k * micro_rows, (k + 1) * micro_rows)
        last = micro == gradient_accumulation_steps - 1
        # all-reduce the gradient once
        with train_model.no_sync() if ddp and not last else nullcontext():
            with ctx, own_dropout_rng(k):
                part = row_losses(train_model, x0[mb], eligible[mb], t[mb], mask_spec,
                                  masks=None if masks is None else tuple(m[mb] for m in masks))
            scaler.scale((w[mb] * part).mean() / gradient_accumulation_steps).backward()
        parts.append(part.detach())
    losses = gather_rows(torch.cat(parts))  # l of every row of the global batch, on every rank
    loss = (w * losses).mean()
    if loss_cv is not None:  # the reported value changes, its gradient does not
        raw_sum += loss.item()
        loss = loss - loss_cv.correction(t, w, losses)
    scaler.unscale_(optimizer)
    # the norm before clipping
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    # GradScaler handles fp16's inf
    for name, value in (("training loss", loss), ("gradient norm", grad_norm)):
        if not torch.isfinite(value) and not (scaler.is_enabled() and name == "gradient norm"):
            raise ValueError(f"iteration {iter_num}: the {name} is {value.item()}; stopped before "
                             f"the update, so {ckpt_path} still holds the last good checkpoint "
                             f"(try a lower --learning_rate)")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update_parameters(model)
    # fitted: bin losses for the next refit
    if ppots_online and t_sampler == "ppots" and iter_num >= ppots_fit_iter:
        sampler.observe(t_cpu, losses.float().cpu())
    iter_num += 1
    t_seen.append(t_cpu)
    w_seen.append(w_cpu)
    loss_sum += loss.detach()
    norm_sum += grad_norm
    n_clipped += bool(grad_clip and grad_norm > grad_clip)
    if iter_num % log_interval == 0:
        t_all = torch.cat(t_seen)
        record = {"iter": iter_num, "loss": loss_sum.item() / len(t_seen),
                  "grad_norm": norm_sum.item() / len(t_seen),
                  "clip_frac": n_clipped / len(t_seen),
                  "lr": lr, "w_mean": torch.cat(w_seen).mean().item(),
                  "t_hist": torch.histc(t_all, bins=10, min=0, max=1).int().tolist()}
        if loss_cv is not None:
            # the plain mean(w l); "loss" is the adjusted value
            record["loss_raw"] = raw_sum / len(t_seen)
        if train_size:
            record["epoch"] = dataset.epoch
        if master:
            log(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        t_seen, w_seen, loss_sum, norm_sum, raw_sum, n_clipped = [], [], 0.0, 0.0, 0.0, 0
    bar.update(1)
bar.close()
if ddp:
    dist.destroy_process_group()
if master:
    finish()
