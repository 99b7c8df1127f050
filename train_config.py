"""train.py's options, nanoGPT style: every default is a plain global below, a config file
assigns some of them, and `--key=value` overrides one (configurator.py). Two functions are the
interface that train.py and the lab's studies share:

    config = parse(argv)                  # defaults + config files + --key=value, typed
    rows = check(config, world_size=1)    # every range and combination check; the clean rows

Nothing here touches the disk but reading config files.
"""
import math
import sys

from configurator import check_ranges, configure
from masking import MODES, clean_rows
from model import check_shape
from samplers import SAMPLERS

_BEFORE = set(vars())  # the options are the globals assigned from here to OPTIONS
# -----------------------------------------------------------------------------
# I/O
out_dir = "out"
eval_interval = 200
eval_iters = 4  # val batches for the ELBO
# val rows per ELBO batch (0 = batch_size): pin it so that runs of different batch sizes score
# the same val rows at the same rates
eval_batch_size = 0
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
variance_n_batches = 16  # training batches for batch_var, the variance of a batch's mean loss
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
OPTIONS = [k for k in vars() if k not in _BEFORE and k != "_BEFORE"]
# -----------------------------------------------------------------------------
RANGES = {
    "seed": (0, None), "batch_size": (1, None), "gradient_accumulation_steps": (1, None), "max_iters": (0, None),
    "eval_interval": (1, None), "eval_iters": (1, None), "eval_problems": (1, None),
    "eval_batch_size": (0, None), "eval_problems_mid": (0, None), "log_interval": (1, None), "num_digits": (1, None),
    "n_layer": (1, None), "n_head": (1, None), "n_embd": (1, None), "dropout": (0.0, 0.99),
    "warmup_iters": (0, None), "lr_decay_iters": (0, None), "min_lr": (0.0, None),
    "weight_decay": (0.0, None), "beta1": (0.0, 0.9999), "beta2": (0.0, 0.9999),
    "grad_clip": (0.0, None), "ppots_fit_iter": (0, None), "ppots_refit_every": (0, None),
    "cv_bins": (0, None), "variance_interval": (0, None), "variance_n_x0": (2, None),
    "variance_n_t": (2, None), "variance_n_masks": (2, None), "variance_grad_n_x0": (2, None),
    "variance_n_batches": (2, None), "sample_length": (0, None), "sample_block_length": (1, None), "train_size": (0, None)}
CHOICES = {"model_type": ("mdm", "arm"), "t_sampler": SAMPLERS, "masking": MODES,
           "ppots_fit": ("epr", "none"), "ppots_support": ("full", "grid"),
           "lr_schedule": ("cosine", "linear"), "isad_tokens": ("none", "default", "first")}


def defaults():
    """Every option's default, as a dict (a fresh copy)."""
    scope = vars(sys.modules[__name__])
    return {k: scope[k] for k in OPTIONS}


def parse(argv):
    """The defaults with argv's config files and --key=value flags applied (unknown keys and
    wrong types are refused)."""
    return configure(defaults(), argv)


def memory_parts(config, seq_len, vocab_size, world_size=1):
    """An estimate of a run's largest allocations in bytes, by the flags that set them (for
    model.check_memory): float32 weights, gradients, AdamW's two moments and a weight EMA; one
    micro-batch's activations (~8 floats per token and layer, and the logits with their gradient);
    the finite training set (train_size) and the held-out prompts (eval_problems). A lower bound:
    what is refused cannot run; what passes may still need more."""
    d, layers = config["n_embd"], config["n_layer"]
    weights = 4 * (12 * layers * d * d + (2 * vocab_size + seq_len) * d)
    views = 2 if config["masking"] != "standard" else 1
    rows = clean_rows(config["batch_size"], config["masking"], config["matched_compute"]) * views
    tokens = rows // (world_size * config["gradient_accumulation_steps"]) * seq_len
    return {"model [--n_embd, --n_layer]": weights * (4 + (config["weight_ema_decay"] > 0)),
            "one step's activations [--batch_size, --block_size or --num_digits]":
                4 * tokens * (8 * layers * d + 2 * vocab_size),
            "the training set [--train_size]": 9 * config["train_size"] * seq_len,
            "the held-out prompts [--eval_problems]": 8 * 2 * config["eval_problems"] * seq_len}


def check(config, world_size=1):
    """ValueError naming the first option out of range, unknown, or in a combination that cannot
    run; else the clean rows per step (masking.clean_rows), which split into world_size x
    gradient_accumulation_steps micro-batches."""
    for key, value in config.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{key}={value!r} is not a finite number")
    check_ranges(config, RANGES)
    for key, allowed in CHOICES.items():
        if config[key] not in allowed:
            raise ValueError(f"unknown --{key}={config[key]}; choose from {', '.join(allowed)}")
    if not config["learning_rate"] > 0 or config["min_lr"] > config["learning_rate"]:
        raise ValueError(f"need 0 < min_lr <= learning_rate, got learning_rate="
                         f"{config['learning_rate']}, min_lr={config['min_lr']}")
    check_shape(config["n_layer"], config["n_head"], config["n_embd"])
    if not 0 < config["isad_delta"] <= 1:
        raise ValueError(f"--isad_delta must be in (0, 1], got {config['isad_delta']}")
    if not 0 <= config["syrm_alpha"] <= 1:
        raise ValueError(f"--syrm_alpha must be in [0, 1] (1 = off), got {config['syrm_alpha']}")
    if config["model_type"] == "arm" and (
            config["masking"] != "standard" or config["t_sampler"] != "uniform"
            or config["isad_tokens"] != "none" or config["syrm_alpha"] != 1):
        raise ValueError("an ARM has no masking rate and masks nothing: use --masking, "
                         "--t_sampler, ISAD and SyRM with --model_type=mdm")
    if config["ppots_online"] and not (config["t_sampler"] == "ppots"
                                       and config["ppots_refit_every"]):
        raise ValueError("--ppots_online=True refits from training losses: it needs "
                         "--t_sampler=ppots and --ppots_refit_every > 0")
    rows = clean_rows(config["batch_size"], config["masking"], config["matched_compute"])
    if rows % (world_size * config["gradient_accumulation_steps"]):
        raise ValueError(f"{rows} clean rows per step do not split into {world_size} processes x "
                         f"{config['gradient_accumulation_steps']} accumulation steps: choose "
                         f"batch_size and gradient_accumulation_steps so they do")
    return rows
