"""Train a masked diffusion model (or its ARM baseline), nanoGPT style.

    python train.py                                   # sort 8 digits, 1000 steps
    python train.py config/some_preset.py --key=value # any option of train_config.py
    python train.py --t_sampler=ppots --masking=mirror
    python train.py --init_from=resume --out_dir=out  # continue from out/ckpt.pt and its config
    python train.py --init_from=pre/ckpt.pt --task=twosort --train_size=2000  # fine-tune (SFT)
    torchrun --standalone --nproc_per_node=2 train.py  # DDP: the same run on 2 processes

One step: x0 ~ dataset, (t, w) ~ sampler, masks ~ spec, then step.py: loss = mean_rows(w * l)
with l = masking.row_losses (the mean of the two views for mirror/pair) -> backward -> clip ->
AdamW, with no host sync: what is logged, and the non-finite guard, are read at log intervals.
batch_size is the global batch: every rank draws the whole step from the same seeded streams and
trains on its own rows, so 1 process, N processes or N accumulation steps run the same estimator
(docs/design.md, "The global batch"). Only rank 0 evaluates, logs, saves, measures variance and
fits P-POTS (whose fitted state it broadcasts). Every check runs before out_dir is touched.
"""
import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import figures
import train_config
import variance
from checkpoint import (LogWindow, append_log, lock_out_dir, restore_run, save_run, start_config,
                        start_log)
from configurator import report_errors
from control_variate import LossControlVariate
from data import task_from_checkpoint, task_from_config
from finetune import check_fits, training_set
from masking import draw_masks, mask_spec_from_config
from model import ModelConfig, Transformer, WeightEMA, check_memory, device_and_dtype
from sample import TEXT_TEMPERATURE, accuracy, text_sample, val_elbo
from samplers import (OnlinePPOTS, build_ppots, describe_fit, make_sampler, restore_sampler,
                      second_moments)
from step import Step, stage

# bad input: one `error:` line (configurator.py), before anything is created
report_errors(memory_hint="lower the batch (--batch_size, or raise --gradient_accumulation_steps), "
                          "the model (--n_embd, --n_layer) or --eval_problems")
DATA_SEED_OFFSET = 1_000_003  # the x0 stream's generator: seed + this, apart from the global one
ddp = "RANK" in os.environ  # started by torchrun
rank, local_rank, world_size = (int(os.environ.get(k, d))
                                for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
master = rank == 0  # evaluates, logs, saves, measures variance, fits P-POTS
# every option of train_config.py becomes a global here: defaults, config files, --key=value,
# then the checkpoint's config for init_from=resume or its shape for a fine-tune
config, resume, pretrained = start_config(train_config.parse(sys.argv[1:]), sys.argv[1:])
rows = train_config.check(config, world_size)  # clean (x0) rows per step
globals().update(config)
if ddp and (device.startswith("cuda") or not device and torch.cuda.is_available()):
    device = f"cuda:{local_rank}"  # one GPU per process, chosen before anything touches CUDA
    torch.cuda.set_device(device)
device, device_type, ptdtype, ctx = device_and_dtype(device, dtype)
decay_iters = lr_decay_iters or max_iters  # the config keeps 0: a resume decays to its max_iters
config = {k: globals()[k] for k in config}
ckpt_path = os.path.join(out_dir, "ckpt.pt")

# init, t and masks: the same seed on every rank. The x0 stream has its own generator, so
# methods with the same rows per step see the same examples, whatever their t/masks consume
torch.manual_seed(seed)
data_gen = torch.Generator().manual_seed(seed + DATA_SEED_OFFSET)
random.seed(seed)  # python and numpy draw nothing here; seeded (and checkpointed) for forks that do
np.random.seed(seed)
dataset = task_from_config(config) if resume is None else \
    task_from_checkpoint(dict(resume[1], config=config), True)
if pretrained is not None:
    check_fits(dataset, task, pretrained[1], init_from)
check_memory(train_config.memory_parts(config, dataset.seq_len, dataset.vocab_size, world_size),
             device)
if task == "text":  # the end-of-run sample's prompt, checked now rather than after training
    dataset.prompt_ids(sample_prompt, model_type == "arm")
dataset = training_set(config, dataset)  # the task, or its finite training set (train_size)
spec = mask_spec_from_config(config, dataset)  # the masking mode, with ISAD / SyRM if on
if resume is not None:
    model = resume[0]
elif pretrained is not None:  # its weights, this run's dropout
    model = Transformer(ModelConfig(**dict(pretrained[1]["model_args"], dropout=dropout)))
    model.load_state_dict(pretrained[0].state_dict())
else:
    model = Transformer(ModelConfig(vocab_size=dataset.vocab_size, mask_id=dataset.mask_id,
                                    block_size=dataset.seq_len, n_layer=n_layer, n_head=n_head,
                                    n_embd=n_embd, dropout=dropout, bias=bias,
                                    causal=model_type == "arm"))
model.to(device).train()
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2))
scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)
sampler = make_sampler("uniform" if t_sampler == "ppots" else t_sampler)  # P-POTS: uniform first
ema = WeightEMA(model, weight_ema_decay) if weight_ema_decay else None
eval_model = model if ema is None else ema.module  # what evaluation and the checkpoint's users see
loss_cv = LossControlVariate(cv_bins, cv_eta) if cv_bins else None
iter_num = 0
if resume is not None:
    iter_num = restore_run(resume[1], optimizer, config, data_gen, dataset, ema, loss_cv)
    sampler = restore_sampler(resume[1]["sampler"])
# ------------------------------------------------------------ the input is good: now out_dir
log_path = os.path.join(out_dir, "log.jsonl")
if master:
    lock = lock_out_dir(out_dir)  # held until the process ends
    start_log(log_path, None if resume is None else iter_num)
    print("config:", json.dumps(config))
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, "
          f"{'causal (ARM)' if model.config.causal else 'bidirectional (MDM)'}")
if ddp:
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
train_model = DDP(model,
                  device_ids=[local_rank] if device_type == "cuda" else None) if ddp else model
if compile and master:  # over the whole loss function, after DDP, as torch's docs advise
    print("compiling the loss (model, masking, mdm_loss): the first steps are slow")


def get_lr(it):
    """Linear warmup, then cosine (or linear) decay from learning_rate to min_lr at decay_iters."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    left = 1.0 - ratio if lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * ratio))
    return min_lr + left * (learning_rate - min_lr)


@contextmanager
def own_dropout_rng(k):
    """With dropout, micro-batch k of the global batch draws its dropout masks from the seed
    (seed, iter_num, k) in a forked RNG, so ranks never share them and the t / mask streams do not
    depend on how the batch is split. Without dropout nothing is drawn or forked."""
    with torch.random.fork_rng(
            devices=[] if device_type == "cpu" else [torch.device(device).index or 0],
            enabled=dropout > 0):
        if dropout > 0:
            torch.manual_seed(hash((seed, iter_num, k)))
        yield


def fit_ppots():
    """Rank 0 measures m(t) on the current model and fits P-POTS (or refits online from the
    binned training losses); every rank then samples t from rank 0's fit."""
    global sampler
    if master and ppots_online and iter_num > ppots_fit_iter:
        sampler.refit_online()
    elif master:
        sampler = build_ppots(model, dataset, spec, fit=ppots_fit, support=ppots_support,
                              generator=torch.Generator().manual_seed(seed + iter_num))
        if ppots_online:  # behind the seam: bins the training losses for the next refit
            sampler = OnlinePPOTS(sampler)
        model.train()
    if ddp:
        state = [sampler.state_dict()]
        dist.broadcast_object_list(state, src=0)
        sampler = restore_sampler(state[0])
    if master:
        tqdm.write(f"iter {iter_num}: P-POTS {describe_fit(sampler)}")
        ratio, optimum = second_moments(sampler)
        append_log(log_path, {"iter": iter_num, "ppots": dict(
            fit=sampler.fit, params=sampler.params, ratio=ratio, optimum=optimum)})


def evaluate():
    """Rank 0: the val ELBO and, for synthetic tasks, held-out exact match; one log record."""
    val_nats, val_se = val_elbo(eval_model, dataset, eval_batch_size or batch_size, eval_iters,
                               device, ctx)
    model.train()
    if not math.isfinite(val_nats):
        raise ValueError(f"iteration {iter_num}: the val ELBO is {val_nats}; nothing was saved")
    record = {"iter": iter_num, "val_nats": val_nats, "val_bits": val_nats / math.log(2),
              "val_se_nats": val_se}
    if hasattr(dataset, "prompts"):
        n = eval_problems if iter_num == max_iters else eval_problems_mid or eval_problems
        record.update(acc=accuracy(eval_model, dataset, n), problems=n)
    append_log(log_path, record)
    acc = f" | held-out exact match {record['acc']:.3f}" if "acc" in record else ""
    tqdm.write(f"iter {iter_num}: val {val_nats:.4f} ± {val_se:.4f} nats/token = "
               f"{record['val_bits']:.4f} bits/token{acc}")


def log_variance():
    """Rank 0: A, B, C of the loss and of the gradient on the current model (variance.measure)."""
    start, g = time.time(), torch.Generator().manual_seed(seed + iter_num)
    kw = dict(n_t=variance_n_t, n_masks=variance_n_masks, generator=g, batch_size=rows,
              n_batches=variance_n_batches)
    res = {"iter": iter_num,
           "loss": variance.measure(model, dataset, sampler, spec, variance_n_x0, target="loss",
                                    **kw),
           "grad": variance.measure(model, dataset, sampler, spec, variance_grad_n_x0,
                                    target="grad", **kw)}
    model.train()
    tqdm.write(variance.format_line(iter_num, res["loss"], res["grad"]))
    append_log(log_path, {"iter": iter_num, "variance": res, "seconds": time.time() - start})


def check_health():
    """Stop at the first non-finite step (its update was skipped on the device, step.py): read at
    every log interval and before every evaluation and checkpoint."""
    bad = step.health()
    if bad is not None:
        raise ValueError(f"iteration {bad[0]}: the training loss is {bad[1]} and the gradient norm "
                         f"{bad[2]}; its update was skipped and the run stopped, so {ckpt_path} "
                         f"holds the last good checkpoint (try a lower --learning_rate)")


def interrupted():
    """What Ctrl-C leaves: configurator.report_errors prints it and exits with status 130."""
    where = f"the last checkpoint is at iteration {saved_iter}; resume with --init_from=resume" \
        if saved_iter is not None else "no checkpoint was written"
    return f"interrupted at iteration {iter_num}; {where}"


step = Step(model, train_model, optimizer, spec, grad_clip, scaler, gradient_accumulation_steps,
            rank, world_size, own_dropout_rng, compile, iter_num, ctx)
window, t0, start_iter = LogWindow(with_raw=loss_cv is not None), time.time(), iter_num
saved_iter = iter_num if resume is not None else None
report_errors(interrupted=interrupted)
bar = tqdm(total=max_iters, initial=iter_num, dynamic_ncols=True, disable=not master)
while True:
    since_fit = iter_num - ppots_fit_iter
    if t_sampler == "ppots" and iter_num < max_iters and (
            since_fit == 0
            or since_fit > 0 and ppots_refit_every and since_fit % ppots_refit_every == 0):
        fit_ppots()
    if master and (iter_num % eval_interval == 0 and iter_num > start_iter
                   or iter_num == max_iters or iter_num == 0 and eval_at_start):
        check_health()
        evaluate()
        if iter_num > start_iter:
            save_run(ckpt_path, model, optimizer, iter_num, config, sampler, data_gen, dataset,
                     ema, loss_cv)
            saved_iter = iter_num
    if master and variance_interval and iter_num % variance_interval == 0 and (
            iter_num > start_iter or iter_num == 0):
        log_variance()
    if iter_num >= max_iters:
        break
    # the step. The global batch, the same on every rank: unlimited data gives mirror/pair at
    # matched compute the first half of Standard's x0 rows; a finite set is asked for its rows
    x0, eligible = stage([z[:rows] for z in (dataset.next_batch(rows, data_gen) if train_size
                                             else dataset.batch(batch_size, "train", data_gen))],
                         device)
    t_cpu, w_cpu = sampler.sample(rows)
    t, w = stage((t_cpu, w_cpu), device)
    masks = draw_masks(eligible, t, spec) if model_type == "mdm" else None
    lr = get_lr(iter_num)
    losses, loss, grad_norm, clipped = step(x0, eligible, t, w, masks, lr)
    raw = loss
    if loss_cv is not None:  # the reported value changes, its gradient does not
        loss = loss - loss_cv.correction(t, w, losses)
    if ema is not None:
        ema.update_parameters(model)
    if ppots_online and t_sampler == "ppots" and iter_num >= ppots_fit_iter:
        sampler.observe(t_cpu, losses.float().cpu())  # binned for the next online refit
    iter_num += 1
    window.add(t_cpu, w_cpu, loss, grad_norm, clipped, raw if loss_cv is not None else 0.0)
    if iter_num % log_interval == 0:
        check_health()
        record = window.record(iter_num, lr)
        if train_size:
            record["epoch"] = dataset.epoch
        if master:
            append_log(log_path, record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
    bar.update(1)
bar.close()
if ddp:
    dist.destroy_process_group()
if master:  # plots, text samples, and the one-line summary
    figures.plot_run(log_path, out_dir, f"{model_type} {t_sampler}/{masking}")
    if t_sampler == "ppots":
        figures.plot_ppots(sampler, os.path.join(out_dir, "ppots.png"))
    final = [json.loads(line) for line in open(log_path) if "val_bits" in line][-1]
    acc = f" | held-out exact match {final['acc']:.3f} ({eval_problems} problems)" \
        if "acc" in final else ""
    if task == "text" and sample_length:  # show what the model writes
        note = dataset.prompt_ids("", model.config.causal)[1]
        if note:
            print(f"note: {note}")
        for prompt in ("", sample_prompt) if sample_prompt else ("",):
            print(f"--- sample{f' after {prompt!r}' if prompt else ''} "
                  f"({sample_block_length}-char blocks, temperature {TEXT_TEMPERATURE}):")
            print(text_sample(eval_model, dataset, prompt, sample_length,
                              block_length=sample_block_length, temperature=TEXT_TEMPERATURE,
                              generator=torch.Generator(device).manual_seed(seed)))
    print(f"done in {time.time() - t0:.0f}s: val {final['val_nats']:.4f} nats/token = "
          f"{final['val_bits']:.4f} bits/token{acc}")
