"""What each method's training step costs against a bare step of the same model (the floor), and
the host syncs per step; one-off costs and generation speed.

    python -m lab.bench                        # train.py's default model and batch, best device
    python -m lab.bench --blocks=30 --variants=floor,standard,MIRROR  # the targets' ratios only
    python -m lab.bench --task=text --data_path=data/tinyshakespeare.txt --block_size=64 \
                        --batch_size=32
    python -m lab.bench --gpu_check            # the GPU check of docs/scaling.md (needs CUDA)

The variants, each a full optimiser step on the same model, dtype, compile setting and rows x tokens:
  floor         forward, mean cross-entropy on every token, backward, clip, fused AdamW, on a batch
                already on the device: what any trainer of this model pays
  staged        train.py's step (step.Step, imported, not rebuilt) on batches, t and w already on
                the device: masks, the MDM loss and the guard on top of the floor
  standard      train.py's loop body as it runs: x0 from the task, t and w from the sampler, staged
                to the device, masks, step.Step; standard - staged is the data's cost
  MIRROR, pair  the same with two views at matched compute (batch_size / 2 clean rows)
  P-POTS        the same with t from a fitted P-POTS (inverse CDF)
Timing: `warmup` steps of each variant, then `blocks` rounds; in each round every variant runs
`block_steps` back-to-back steps (the order rotates from round to round), timed with one
synchronize per block (perf_counter on the CPU, CUDA events on a GPU). A ratio is computed per
round, so that a machine that speeds up or slows down affects both sides alike, and reported with
its 95 % bootstrap CI over rounds (lab.stats.bootstrap); a target is "met" only when the CI's upper
end is at most the target. Host syncs per step: every Python-level read of a tensor's value
(item, bool, float, int, tolist, cpu, numpy) counted over `block_steps` steps of each variant, as
test_all.py's sync test counts them.
"""
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

import train_config
import variance
from configurator import check_ranges, configure_globals, report_errors
from data import task_from_config
from masking import MaskSpec, clean_rows, draw_masks
from model import ModelConfig, Transformer, check_memory, check_shape, device_and_dtype
from sample import generate
from samplers import PPOTS, make_sampler, measure_curve
from step import Step, stage
from lab.stats import bootstrap

report_errors()  # bad input: one `error:` line (configurator.py)
# the run being priced: train.py's defaults
task = "sort"
num_digits = 8
data_path = ""
block_size = 256
batch_size = 128
n_layer = 4
n_head = 4
n_embd = 128
max_iters = 1000  # a default run, for the one-off fractions
variance_interval = 200  # train.py's variance logging: max_iters / variance_interval + 1 calls
# timing
warmup = 50
blocks = 10
block_steps = 100
variants = "floor,staged,standard,MIRROR,pair,P-POTS"  # those timed (fewer: shorter rounds)
gen_rows = 64  # prompts per generation call
seed = 1337
device = ""  # '' = auto: cuda > mps > cpu
dtype = ""  # '' = auto, as train.py (model.device_and_dtype)
compile = ""  # '' = eager; 'default' or 'reduce-overhead': torch.compile's mode over the loss
gpu_check = False  # the GPU check (docs/scaling.md): sync debug mode, profiler, recompiles
# -----------------------------------------------------------------------------
config = configure_globals(globals())
check_ranges(config, {"warmup": (1, None), "blocks": (3, None), "block_steps": (1, None),
                      "batch_size": (2, None), "gen_rows": (1, None), "max_iters": (1, None),
                      "variance_interval": (1, None), "n_layer": (1, None), "n_head": (1, None),
                      "n_embd": (1, None), "num_digits": (1, None)})
check_shape(n_layer, n_head, n_embd)
VARIANTS = ("floor", "staged", "standard", "MIRROR", "pair", "P-POTS")
chosen = [v.strip() for v in variants.split(",") if v.strip()]
if "standard" not in chosen or not set(chosen) <= set(VARIANTS) or len(set(chosen)) < len(chosen):
    raise ValueError(f"--variants={variants!r}: name standard (the one-offs' reference) and any "
                     f"of {', '.join(VARIANTS)}, each at most once")
if compile not in ("", "default", "reduce-overhead"):
    raise ValueError(f"--compile={compile!r}: use '' (eager), 'default' or 'reduce-overhead'")
device, device_type, ptdtype, ctx = device_and_dtype(device, dtype)
if gpu_check and device_type != "cuda":
    raise ValueError("--gpu_check needs a CUDA GPU (this run's device is " + device + ")")
torch.manual_seed(seed)
gen = torch.Generator().manual_seed(seed)
dataset = task_from_config(config)
check_memory(train_config.memory_parts({**train_config.defaults(), **{
    k: v for k, v in config.items() if k in train_config.OPTIONS}}, dataset.seq_len,
    dataset.vocab_size), device)
model = Transformer(ModelConfig(vocab_size=dataset.vocab_size, mask_id=dataset.mask_id,
                                block_size=dataset.seq_len, n_layer=n_layer, n_head=n_head,
                                n_embd=n_embd)).to(device).train()
optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99))
scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)
tokens = batch_size * dataset.seq_len  # forward tokens per training step, for every method
SYNCS = ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy")
COMPARISONS = [("staged", "floor", None), ("standard", "floor", 1.05), ("standard", "staged", None),
               ("MIRROR", "standard", 1.05), ("pair", "standard", None),
               ("P-POTS", "standard", None)]  # (variant, reference, target ratio or None)


def sync():
    if device_type == "cuda":
        torch.cuda.synchronize()


def make_step(masking):
    return Step(model, model, optimizer, MaskSpec(masking), 1.0, scaler, autocast=ctx,
                compile=compile or False)


def floor_variant():
    """The floor: the same model and optimiser, one loss on every token, a batch on the device."""
    x = stage([dataset.batch(batch_size, "train", gen)[0]], device)[0]
    params = [p for p in model.parameters() if p.requires_grad]
    forward = torch.compile(model, mode=None if compile == "default" else compile) \
        if compile else model

    def floor():
        with ctx:
            logits = forward(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), x.flatten())
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return floor


def staged_variant():
    """train.py's step on a batch, t and w already on the device (masks drawn each step)."""
    train_step, rows = make_step("standard"), batch_size
    x0, eligible = stage(dataset.batch(rows, "train", gen), device)
    t, w = stage(make_sampler("uniform").sample(rows, gen), device)
    return lambda: train_step(x0, eligible, t, w, draw_masks(eligible, t), 1e-3)


def loop_variant(masking, sampler):
    """train.py's loop body: data from the task and t from the sampler, staged, masks, the step."""
    train_step, rows = make_step(masking), clean_rows(batch_size, masking, matched_compute=True)
    spec = MaskSpec(masking)

    def body():
        x0, eligible = stage([z[:rows] for z in dataset.batch(batch_size, "train", gen)], device)
        t, w = stage(sampler.sample(rows), device)
        train_step(x0, eligible, t, w, draw_masks(eligible, t, spec), 1e-3)
    return body


def time_block(fn, n):
    """Seconds for n back-to-back calls, one synchronize at each end."""
    if device_type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return time.perf_counter() - t0


def interleaved(variants):
    """{name: [seconds per step in each round]}: warm-up, then `blocks` rotating rounds."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    names, times = list(variants), {name: [] for name in variants}
    for r in range(blocks):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(time_block(variants[name], block_steps) / block_steps)
    return times


def syncs_per_step(fn):
    """Python-level reads of a tensor's value per call of fn, over block_steps calls."""
    count, originals = [0], {name: getattr(torch.Tensor, name) for name in SYNCS}

    def counted(orig):
        def read(self, *a, **kw):
            count[0] += 1
            return orig(self, *a, **kw)
        return read
    for name, orig in originals.items():
        setattr(torch.Tensor, name, counted(orig))
    try:
        for _ in range(block_steps):
            fn()
    finally:
        for name, orig in originals.items():
            setattr(torch.Tensor, name, orig)
    return count[0] / block_steps


def ratio(times, a, b):
    """mean over rounds of time(a) / time(b) in the same round, and its 95 % bootstrap CI."""
    r = np.array(times[a]) / np.array(times[b])
    return bootstrap(lambda i: float(r[i].mean()), len(r))


def one_off(fn, n=3):
    fn()
    return statistics.median(time_block(fn, 1) for _ in range(n))


def log_variance(sampler):
    """train.py's in-training variance logging at its defaults: loss and gradient A, B, C."""
    kw = dict(n_t=4, n_masks=2, generator=torch.Generator().manual_seed(seed),
              batch_size=batch_size, n_batches=16)
    variance.measure(model, dataset, sampler, MaskSpec(), 16, target="loss", **kw)
    variance.measure(model, dataset, sampler, MaskSpec(), 4, target="grad", **kw)
    model.train()


def bench():
    uniform = make_sampler("uniform")
    curve = measure_curve(model, dataset, generator=torch.Generator().manual_seed(seed))
    ppots = PPOTS(curve["t"], curve["m"].sqrt())
    model.train()
    make = {"floor": floor_variant, "staged": staged_variant,
            "standard": lambda: loop_variant("standard", uniform),
            "MIRROR": lambda: loop_variant("mirror", uniform),
            "pair": lambda: loop_variant("pair", uniform),
            "P-POTS": lambda: loop_variant("standard", ppots)}
    variants = {name: make[name]() for name in VARIANTS if name in chosen}
    print(f"bench: {device} ({str(ptdtype)[6:]}{', compile ' + compile if compile else ''}), "
          f"task={task}, {n_layer}x{n_embd} ({model.num_params() / 1e6:.2f}M parameters), batch "
          f"{batch_size} x {dataset.seq_len} tokens, {torch.get_num_threads()} CPU threads; "
          f"{blocks} rounds of {block_steps} steps per variant after {warmup} warm-up steps")
    times = interleaved(variants)
    mean = {name: statistics.mean(ts) for name, ts in times.items()}
    print(f"\n{'training step':<12}{'ms/step':>9}{'tokens/s':>12}{'syncs/step':>12}")
    for name, fn in variants.items():
        print(f"{name:<12}{mean[name] * 1e3:9.3f}{tokens / mean[name]:12,.0f}"
              f"{syncs_per_step(fn):12.2f}")
    print(f"\n{'ratio':<22}{'mean [95 % CI over rounds]':>28}")
    for a, b, target in (c for c in COMPARISONS if c[0] in times and c[1] in times):
        r = ratio(times, a, b)
        met = f"   target <= {target}: {'met' if r['hi'] <= target else 'not met'}" if target else ""
        print(f"{a + ' / ' + b:<22}{r['est']:>10.3f} [{r['lo']:.3f}, {r['hi']:.3f}]{met}")
    x0, eligible = dataset.batch(batch_size, "train", gen)
    t = uniform.sample(batch_size)[0]
    draw = {f"{s.name}.sample({batch_size})": one_off(lambda s=s: s.sample(batch_size), 200)
            for s in (uniform, ppots)}
    draw[f"{task} batch({batch_size}) on the CPU"] = one_off(
        lambda: dataset.batch(batch_size, "train", gen), 200)
    draw[f"draw_masks({batch_size} rows) on the CPU"] = one_off(lambda: draw_masks(eligible, t), 200)
    variance_seconds = one_off(lambda: log_variance(uniform))
    run = max_iters * mean["standard"]
    calls = max_iters // variance_interval + 1
    print(f"\n{'one-offs':<36}{'ms/call':>10}")
    for name, seconds in draw.items():
        print(f"{name:<36}{seconds * 1e3:10.4g}   {seconds / mean['standard']:.2%} of a standard "
              f"step")
    print(f"{'variance logging (loss + grad)':<36}{variance_seconds * 1e3:10.4g}   x {calls} calls = "
          f"{calls * variance_seconds / run:.1%} of a {max_iters}-step run (target <= 10%)")
    print("(P-POTS's one-off measure + fit: python -m lab.ppots_cost)")
    prompts = (dataset.prompts(gen_rows, "val", gen) if hasattr(dataset, "prompts")
               else torch.empty(gen_rows, 0, dtype=torch.long)).to(device)
    response_len = dataset.response_len if hasattr(dataset, "prompts") else dataset.seq_len
    print(f"\ngeneration ({gen_rows} x {response_len} tokens){'ms/call':>10}{'tokens/s':>12}")
    model.eval()
    for steps in sorted({1, min(8, response_len), response_len}):
        seconds = one_off(lambda: generate(model, prompts, response_len, steps))
        label = f"{steps} step" + "s" * (steps > 1)
        print(f"{label:<36}{seconds * 1e3:10.4g}{gen_rows * response_len / seconds:12,.0f}")


def check_gpu():
    """docs/scaling.md's GPU check: syncs the CUDA sync debugger sees over 20 steps of train.py's
    step; kernels and syncs per step of the floor and of the step (profiler); recompiles and graph
    breaks of the compiled loss (torch._logging)."""
    import warnings
    from torch.profiler import ProfilerActivity, profile
    torch._logging.set_logs(recompiles=True, graph_breaks=True)
    body = loop_variant("standard", make_sampler("uniform"))
    for _ in range(warmup):
        body()
    sync()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(20):
            body()
        sync()
    torch.cuda.set_sync_debug_mode(0)
    found = [w for w in caught if "synchroniz" in str(w.message)]
    print(f"sync debug mode over 20 steps: {len(found)} warnings (expected 0)")
    for w in found[:5]:
        print(f"  {w.filename}:{w.lineno}: {w.message}")
    for name, fn in (("floor", floor_variant()), ("train step", body)):
        for _ in range(5):
            fn()
        sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fn()
            sync()
        events = prof.key_averages()
        count = lambda *keys: sum(e.count for e in events if any(k in e.key for k in keys)) / 10
        print(f"{name}: {count('cudaLaunchKernel', 'cuLaunchKernel'):.0f} kernel launches, "
              f"{count('cudaStreamSynchronize', 'cudaDeviceSynchronize'):.1f} synchronizes, "
              f"{count('cudaMemcpy', 'cudaMemcpyAsync'):.1f} copies per step")


if __name__ == "__main__":
    check_gpu() if gpu_check else bench()
