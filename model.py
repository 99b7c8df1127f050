"""A small transformer denoiser (nanoGPT layout) with bidirectional attention for the MDM,
and causal attention for the autoregressive (ARM) baseline -- the same class, one flag."""
import copy
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F



@dataclass
class ModelConfig:
    vocab_size: int = 13  # includes the [MASK] token
    mask_id: int = 12
    block_size: int = 17
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    causal: bool = False  # False: MDM denoiser; True: ARM baseline

    def __post_init__(self):
        check_shape(self.n_layer, self.n_head, self.n_embd)


def check_shape(n_layer, n_head, n_embd):
    """ValueError unless the transformer can be built: positive sizes, n_head divides n_embd."""
    for name, value in (("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name}={value!r} is out of range: it must be an integer >= 1")
    if n_embd % n_head:
        raise ValueError(f"--n_head={n_head} does not divide --n_embd={n_embd}")


class SelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.causal, self.dropout = cfg.n_head, cfg.causal, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=self.causal)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias), nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias), nn.Dropout(cfg.dropout))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as in nanoGPT
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 scaled init of residual projections
            if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        """Parameter count, position embeddings excluded (nanoGPT's convention)."""
        return sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()

    def forward(self, idx):
        """idx LongTensor[B, T] (with [MASK] tokens for the MDM) -> logits FloatTensor[B, T, V]."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def configure_optimizers(self, weight_decay, learning_rate, betas):
        """Fused AdamW (one kernel per step; it can skip a non-finite step on the device, step.py);
        weight decay on matrices (>= 2-D) only, never on norms or biases."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=True)


def available_memory(device):
    """Bytes `device` can still allocate: a GPU's free memory, MPS's recommended working set, else
    the host's available memory (MemAvailable on Linux, the physical memory elsewhere)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if kind == "mps":
        return torch.mps.recommended_max_memory()
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f
                        if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(parts, device):
    """ValueError if the estimated bytes of `parts` ({what, with its flags: bytes}) exceed what
    `device` can allocate (available_memory): the message gives each part, largest first, so the
    flag to lower is named before anything is allocated."""
    need, have = sum(parts.values()), available_memory(device)
    if need > have:
        gb = lambda b: f"{b / 2 ** 30:,.1f} GB"
        detail = ", ".join(f"{what} {gb(b)}" for what, b in
                           sorted(parts.items(), key=lambda kv: -kv[1]) if b >= 0.01 * need)
        raise ValueError(f"this needs about {gb(need)} ({detail}), more than the {gb(have)} "
                         f"that {device} has available: lower the first flag named")


def check_device(device):
    """ValueError unless `device` ('' = auto) names a device this machine has:
    cpu, cuda[:N], mps."""
    if not device or device == "cpu":
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this machine has no CUDA GPU "
                         f"(or this torch {torch.__version__} has no CUDA support): "
                         f"use --device=cpu")
    if kind == "cuda" and (torch.device(device).index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} asked for, but this machine has "
                         f"{torch.cuda.device_count()} GPU(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' asked for, but Apple's MPS backend is not available here")
    if kind not in ("cuda", "mps"):
        raise ValueError(f"device {device!r} is not supported here; use cpu, cuda, cuda:N or mps")


def device_and_dtype(device="", dtype=""):
    """(device, device type, torch dtype, autocast context) for train.py and bench.py. '' = auto:
    cuda > mps > cpu; bfloat16 autocast on GPUs that run it natively (compute capability >= 8),
    float16 on older ones such as Colab's T4 (the caller adds a GradScaler), float32 elsewhere.
    Whatever the autocast dtype, mdm_loss applies the 1/p and 1/p(t) weights in float32: p goes
    down to 1e-3, and bfloat16 keeps only 8 significant bits."""
    check_device(device)
    if dtype not in ("", "float32", "bfloat16", "float16"):
        raise ValueError(f"unknown --dtype={dtype}; use float32, bfloat16 or float16")
    device = device or ("cuda" if torch.cuda.is_available()
                        else "mps" if torch.backends.mps.is_available() else "cpu")
    device_type = "cuda" if "cuda" in device else device
    if not dtype:
        native_bf16 = device_type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
        dtype = "float32" if device_type != "cuda" else "bfloat16" if native_bf16 else "float16"
    ptdtype = getattr(torch, dtype)
    return device, device_type, ptdtype, \
        nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, ptdtype)


class WeightEMA:
    """Weight EMA (train.py's weight_ema_decay): theta_ema <- decay theta_ema + (1 - decay) theta
    after every optimiser step, starting from a copy of the weights at the first update. `.module`
    is the averaged Transformer (buffers copied from the model), `.update_parameters(model)` the
    step, `.n_averaged` the number of updates so far (a python int: the update never reads the
    device). Averaging the last ~1/(1 - decay) iterates smooths the evaluated model, the standard
    tool against run-to-run variability of what is evaluated (MDLM: 0.9999, for ~1M steps; runs of
    ~1000 iters want ~0.99). decay = 0 tracks the weights exactly."""

    def __init__(self, model, decay):
        if not 0 <= decay < 1:
            raise ValueError(f"weight_ema_decay must be in [0, 1) (0 = off), got {decay}")
        self.module, self.decay, self.n_averaged = copy.deepcopy(model), decay, 0
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update_parameters(self, model):
        ema, new = list(self.module.parameters()), [p.detach() for p in model.parameters()]
        if self.n_averaged == 0:
            torch._foreach_copy_(ema, new)
        else:
            torch._foreach_lerp_(ema, new, 1.0 - self.decay)
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            mine.copy_(theirs)
        self.n_averaged += 1
