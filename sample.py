"""Generation by iterative unmasking (LLaDA-style), held-out accuracy and the val ELBO.

    python sample.py --out_dir=out                    # synthetic task: held-out problems + accuracy
    python sample.py --out_dir=out --prompt=31415926= # answer one prompt
    python sample.py --out_dir=out --steps=4 --remasking=random --block_length=4
    python sample.py --out_dir=out-shakespeare-char-cpu --prompt=ROMEO:   # text, temperature 0.8

The response starts fully masked. Each step runs the model on the whole sequence, predicts a token
for every masked position (argmax, or a Gumbel-max sample at temperature > 0), and commits k of
them; the rest stay masked for the next step. "low_confidence" remasking commits the k predictions
with the highest model probability and re-masks the low-confidence rest (LLaDA's default);
"random" commits k masked positions chosen uniformly at random. With block_length < response
length the response is generated block by block, left to right (semi-autoregressive), steps split
evenly over the blocks and k spread evenly over each block's steps. A causal (ARM) checkpoint
decodes left to right, one token per forward pass.

Temperature: text samples default to 0.8 (nanoGPT's default), since greedy low-confidence decoding
of text tends to repeat itself; synthetic tasks default to 0 (greedy, deterministic), and held-out
accuracy is always greedy. --temperature=0 asks for greedy text. A text checkpoint that stored its
vocabulary (ckpt["vocab"]) samples without its data file; if the file is still there, it must have
the same vocabulary.
"""
import math
import os
import sys

import torch

from configurator import configure, report_errors
from data import task_from_checkpoint
from masking import MaskSpec, row_losses, uniform_like
from checkpoint import load_checkpoint
from model import check_memory

# the default for text samples (nanoGPT's); synthetic tasks default to greedy
TEXT_TEMPERATURE = 0.8
REMASKING = ("low_confidence", "random")
EVAL_SEED = 1234  # the held-out problems and the val ELBO's batches, t-grid masks: fixed


def _commit_counts(n_tokens, steps):
    """How many tokens to commit at each step: n_tokens spread evenly over `steps` steps."""
    base, extra = divmod(n_tokens, steps)
    return [base + (i < extra) for i in range(steps)]


def _predict(logits, temperature, generator):
    """Token choice per position: argmax, or a Gumbel-max draw from
    softmax(logits / temperature)."""
    if temperature <= 0:
        return logits.argmax(-1)
    u = uniform_like(logits, generator).clamp_(1e-20, 1.0)
    return (logits / temperature - torch.log(-torch.log(u))).argmax(-1)


@torch.no_grad()
def generate(model, prompt, response_len, steps=None, temperature=0.0, remasking="low_confidence",
             block_length=None, generator=None):
    """prompt LongTensor[n, Tp] -> full sequences LongTensor[n, Tp + response_len], every mask
    filled. steps (> 0) defaults to response_len (one token per step); block_length (> 0) defaults
    to the whole response; temperature >= 0, 0 = greedy. The prompt is never changed."""
    if remasking not in REMASKING:
        raise ValueError(f"unknown remasking {remasking!r}; use low_confidence or random")
    if steps is not None and steps <= 0:
        raise ValueError(f"steps must be > 0 (or None: one token per step), got {steps}")
    if block_length is not None and block_length <= 0:
        raise ValueError(f"block_length must be > 0 (or None: the whole response), "
                         f"got {block_length}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    cfg = model.config
    n, Tp = prompt.shape
    x = torch.cat([prompt, torch.full((n, response_len), cfg.mask_id, device=prompt.device)], 1)
    if cfg.causal:
        for i in range(Tp, Tp + response_len):
            logits = model(x[:, :i])[:, -1].float()
            logits[:, cfg.mask_id] = -math.inf
            x[:, i] = _predict(logits, temperature, generator)
        return x
    block_length = block_length or response_len
    n_blocks = math.ceil(response_len / block_length)
    steps = steps or response_len
    if steps < n_blocks:
        raise ValueError(f"steps={steps} is fewer than the {n_blocks} blocks of length "
                         f"{block_length}")
    for b in range(n_blocks):
        lo, hi = Tp + b * block_length, min(Tp + (b + 1) * block_length, Tp + response_len)
        block_steps = steps // n_blocks + (b < steps % n_blocks)
        for k in _commit_counts(hi - lo, block_steps):
            if k == 0:
                continue
            logits = model(x).float()
            logits[..., cfg.mask_id] = -math.inf
            pred = _predict(logits, temperature, generator)
            if remasking == "low_confidence":
                conf = torch.softmax(logits, -1).gather(-1, pred[..., None])[..., 0]
            else:
                conf = uniform_like(x, generator)
            candidate = x == cfg.mask_id
            candidate[:, :lo] = candidate[:, hi:] = False
            conf = conf.masked_fill(~candidate, -math.inf)
            commit = torch.zeros_like(candidate).scatter_(1, conf.topk(k, dim=1).indices, True)
            x = torch.where(commit & candidate, pred, x)
    return x


@torch.no_grad()
def accuracy(model, dataset, n_problems, steps=None, block_length=None, seed=EVAL_SEED,
             batch=512):
    """Exact-match accuracy on n_problems held-out (val) prompts, greedy and deterministic."""
    g = torch.Generator().manual_seed(seed)
    prompts = dataset.prompts(n_problems, "val", generator=g)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    for chunk in prompts.split(batch):
        x = generate(model, chunk.to(device), dataset.response_len, steps,
                     block_length=block_length)
        correct += dataset.is_correct(chunk, x[:, dataset.prompt_len:].cpu()).sum().item()
    model.train(was_training)
    return correct / n_problems


@torch.no_grad()
def val_elbo(model, dataset, rows, n_batches, device, ctx, mask_seed=None):
    """(val negative ELBO, its masking error), in nats per maskable token (a char for task=text),
    in eval mode: the standard MDM objective (whatever ISAD/SyRM train on) on n_batches fixed val
    batches of `rows`, at a fixed stratified t-grid (the midpoints of `rows` strata) and fixed
    masks (own generator), so the same weights give the same number. Comparable with an ARM's val
    loss, its next-token cross-entropy per response token. The caller restores the training mode.

    The error is the standard error that the masks alone give the estimate, on these val rows and
    rates: a second, independent mask draw per row (its own generator) gives d_i = l_i - l'_i, and
    SE^2 = sum_i d_i^2 / 2 / N^2 over the N = rows x n_batches rows, an unbiased estimate of
    Var(mean_i l_i | x0, t) = sum_i Var(l_i | x0_i, t_i) / N^2, the A of the paper at fixed x0
    and t. Two runs scored on the same val rows differ by at least this much noise; an ARM has
    none (0). mask_seed: draw both mask sets from generators of their own (mask_seed, and
    mask_seed + 1), not from the val batches' one, so that calls with other mask_seeds score the
    same val rows with other masks (how the error is tested)."""
    model.eval()
    g = torch.Generator().manual_seed(EVAL_SEED)
    g1 = g if mask_seed is None else torch.Generator().manual_seed(mask_seed)
    g2 = torch.Generator().manual_seed(EVAL_SEED + 1 if mask_seed is None else mask_seed + 1)
    t = ((torch.arange(rows) + 0.5) / rows).to(device)
    total, sq = 0.0, 0.0
    for _ in range(n_batches):
        x0, eligible = (z.to(device) for z in dataset.batch(rows, "val", g))
        with ctx:
            losses = row_losses(model, x0, eligible, t, MaskSpec(), g1).float()
            d = losses - row_losses(model, x0, eligible, t, MaskSpec(), g2).float()
        total += losses.mean().item()
        sq += d.square().sum().item()
    return total / n_batches, math.sqrt(sq / 2) / (rows * n_batches)


@torch.no_grad()
def text_sample(model, dataset, prompt="", length=256, **gen):
    """Up to `length` characters after `prompt` (dataset.prompt_ids: no prompt starts from a
    newline where the corpus has one, so that an ARM has a first token to condition on), as one
    string. `gen` goes to generate(); its temperature defaults to 0 (greedy), which for text with
    low-confidence remasking tends to give repetitive text: pass temperature=0.8 (and a generator)
    for samples like sample.py's."""
    ids, _ = dataset.prompt_ids(prompt, model.config.causal)
    length = min(length, dataset.block_size - len(ids))
    was_training = model.training
    model.eval()
    x = generate(model, ids[None].to(next(model.parameters()).device), length, **gen)
    model.train(was_training)
    return dataset.decode(x[0].cpu())


def check_flags(cfg):
    """One clear error for a sample.py flag that makes no sense, before any work."""
    t = cfg["temperature"]
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0):
        raise ValueError(f"--temperature must be a number >= 0 (0 = greedy; "
                         f"default {TEXT_TEMPERATURE} for text, 0 for synthetic tasks), got {t!r}")
    if cfg["steps"] < 0:
        raise ValueError(f"--steps must be >= 0 (0 = one token per step), got {cfg['steps']}")
    if cfg["block_length"] < 0:
        raise ValueError(f"--block_length must be >= 0 (0 = the whole response as one block), "
                         f"got {cfg['block_length']}")
    for key in ("num_samples", "length"):
        if cfg[key] <= 0:
            raise ValueError(f"--{key} must be > 0, got {cfg[key]}")
    if cfg["remasking"] not in REMASKING:
        raise ValueError(f"unknown --remasking={cfg['remasking']}; use low_confidence or random")


def main(argv):
    """sample.py's command line (see the module docstring); bad flags raise ValueError."""
    cfg = configure(dict(out_dir="out", prompt="", steps=0, temperature=None,
                         remasking="low_confidence", block_length=0, num_samples=4, length=256,
                         device="cpu", seed=1337), argv)
    check_flags(cfg)
    model, ckpt = load_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"), cfg["device"])
    dataset = task_from_checkpoint(ckpt)
    synthetic = hasattr(dataset, "prompts")
    n = cfg["num_samples"] if synthetic and not cfg["prompt"] else 1  # rows generated at once
    check_memory({"the samples [--num_samples]": 4 * 3 * n * dataset.seq_len * dataset.vocab_size},
                 cfg["device"])
    temperature = cfg["temperature"]
    if temperature is None:
        temperature = 0.0 if synthetic else TEXT_TEMPERATURE
    g = torch.Generator().manual_seed(cfg["seed"])
    gen = dict(steps=cfg["steps"] or None, temperature=temperature,
               remasking=cfg["remasking"], block_length=cfg["block_length"] or None, generator=g)
    if synthetic:
        if cfg["prompt"]:
            prompt = dataset.encode(cfg["prompt"])[None]
        else:
            prompt = dataset.prompts(cfg["num_samples"], "val",
                                  generator=torch.Generator().manual_seed(cfg["seed"]))
        x = generate(model, prompt.to(cfg["device"]), dataset.response_len, **gen).cpu()
        ok = dataset.is_correct(prompt, x[:, dataset.prompt_len:])
        for row, good in zip(x, ok):
            prompt_len = dataset.prompt_len
            print(f"{dataset.decode(row[:prompt_len])}{dataset.decode(row[prompt_len:])}  "
                  f"{'ok' if good else 'WRONG'}")
        if not cfg["prompt"]:
            acc = accuracy(model, dataset, ckpt["config"]["eval_problems"], cfg["steps"] or None,
                           cfg["block_length"] or None)
            print(f"held-out exact match: {acc:.3f} on {ckpt['config']['eval_problems']} problems")
        return
    note = dataset.prompt_ids(cfg["prompt"], model.config.causal)[1]
    if note:
        print(f"note: {note}")
    for _ in range(cfg["num_samples"]):
        print(text_sample(model, dataset, cfg["prompt"], cfg["length"], **gen) + "\n" + "-" * 40)


if __name__ == "__main__":
    report_errors(memory_hint="lower --num_samples")
    main(sys.argv[1:])
