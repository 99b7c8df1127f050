"""What each method costs per training step, against a bare step of the same model on the
same batch (the floor).

    python -m lab.bench                        # train.py's default model and batch, best device
    python -m lab.bench --device=cpu --repeats=50
    python -m lab.bench --task=text --data_path=data/tinyshakespeare.txt --block_size=64 \
                        --batch_size=32

Every figure is a median of timed calls after untimed warm-up calls (CUDA synchronised), printed as
ms per call, tokens/s where tokens are processed, and its ratio to one floor step. The training
steps: `repeats` calls after `warmup`, timed in turns (floor, standard, MIRROR, ..., floor,
standard, ...) so that a machine that speeds up or slows down affects them all alike; drawing t: 200
calls; the one-offs: 3 after 1; generation: max(3, repeats // 5) after 2. The training steps are
train.py's step with one process and one micro-batch (x0 from the task, t and w from the sampler,
masks, row_losses, w-weighted mean, backward, grad clip, AdamW), composed here from the same calls.
The one-off costs (variance logging, P-POTS measure + fit) are also given as a fraction of the steps
of a default run: max_iters steps at the measured standard step time.
"""
import statistics
import time

import torch
import torch.nn.functional as F

import variance
from configurator import check_ranges, configure_globals, report_errors
from data import task_from_config
from masking import MaskSpec, clean_rows, row_losses
from model import ModelConfig, Transformer, check_shape, device_and_dtype
from sample import generate
from samplers import PPOTS, make_sampler, measure_curve

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
# train.py's variance logging: max_iters / variance_interval + 1 calls per run
variance_interval = 200
# timing
warmup = 5
repeats = 30
gen_rows = 64  # prompts per generation call
seed = 1337
device = ""  # '' = auto: cuda > mps > cpu
dtype = ""  # '' = auto, as train.py (model.device_and_dtype)
compile = False
# -----------------------------------------------------------------------------
config = configure_globals(globals())
check_ranges(config, {"warmup": (1, None), "repeats": (3, None), "batch_size": (2, None),
                      "gen_rows": (1, None), "max_iters": (1, None), "variance_interval": (1, None),
                      "n_layer": (1, None), "n_head": (1, None), "n_embd": (1, None),
                      "num_digits": (1, None)})
check_shape(n_layer, n_head, n_embd)
device, device_type, ptdtype, ctx = device_and_dtype(device, dtype)
torch.manual_seed(seed)
gen = torch.Generator().manual_seed(seed)
dataset = task_from_config(config)
model = Transformer(ModelConfig(vocab_size=dataset.vocab_size, mask_id=dataset.mask_id,
                                block_size=dataset.seq_len, n_layer=n_layer, n_head=n_head,
                                n_embd=n_embd)).to(device).train()
optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), device_type)
scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)
step_model = torch.compile(model) if compile else model
tokens = batch_size * dataset.seq_len  # forward tokens per training step, for every method


def sync():
    if device_type == "cuda":
        torch.cuda.synchronize()


def timed(fns, n=None, warm=None):
    """{name: median seconds per call} of the functions in `fns` ({name: fn}), called in turns n
    times (default: repeats) after `warm` (default: warmup) calls each."""
    for fn in fns.values():
        for _ in range(warmup if warm is None else warm):
            fn()
    times = {name: [] for name in fns}
    for _ in range(n or repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def update(loss):
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


x_floor = dataset.batch(batch_size, "train", gen)[0].to(device)


def floor_step():
    """The bare step: forward, mean cross-entropy on every token, backward, AdamW; no masks, no t,
    no clipping."""
    with ctx:
        loss = F.cross_entropy(step_model(x_floor).float().flatten(0, 1), x_floor.flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_step(masking, sampler):
    """train.py's step (one process, one micro-batch); mirror/pair use batch_size / 2 clean rows
    (matched compute)."""
    rows = clean_rows(batch_size, masking, matched_compute=True)

    def step():
        x0, eligible = (z[:rows].to(device) for z in dataset.batch(batch_size, "train", gen))
        t, w = (z.to(device) for z in sampler.sample(rows))
        with ctx:
            loss = (w * row_losses(step_model, x0, eligible, t, MaskSpec(masking))).mean()
        update(loss)
    return step


def log_variance(sampler):
    """train.py's in-training variance logging at its defaults: loss and gradient A, B, C."""
    kw = dict(n_t=4, n_masks=2, generator=torch.Generator().manual_seed(seed),
              batch_size=batch_size, n_batches=16)
    variance.measure(model, dataset, sampler, MaskSpec(), 16, target="loss", **kw)
    variance.measure(model, dataset, sampler, MaskSpec(), 4, target="grad", **kw)
    model.train()


def main():
    uniform = make_sampler("uniform")
    print(f"bench: {device} ({str(ptdtype)[6:]}{', compiled' if compile else ''}), task={task}, "
          f"{n_layer}x{n_embd} ({model.num_params() / 1e6:.2f}M parameters), batch {batch_size} x "
          f"{dataset.seq_len} tokens, {torch.get_num_threads()} CPU threads, median of {repeats} "
          f"after {warmup} warm-up")
    # build_ppots's
    curve = measure_curve(model, dataset, generator=torch.Generator().manual_seed(seed))
    ppots = PPOTS(curve["t"], curve["m"].sqrt())
    measure_seconds, fit_seconds = timed({  # the one-offs: median of 3 after 1
        "measure": lambda: measure_curve(model, dataset,
                                         generator=torch.Generator().manual_seed(seed)),
        "fit": lambda: PPOTS(curve["t"], curve["m"].sqrt())}, n=3, warm=1).values()
    floor, standard, mirror, pair, ppots_step = timed({
        "floor": floor_step, "standard": train_step("standard", uniform),
        "mirror": train_step("mirror", uniform), "pair": train_step("pair", uniform),
        "ppots": train_step("standard", ppots)}).values()
    draw = timed({s.name: lambda s=s: s.sample(batch_size) for s in (uniform, ppots)}, n=200)
    variance_seconds = timed({"variance": lambda: log_variance(uniform)}, n=3, warm=1)["variance"]
    run = max_iters * standard  # the training steps of a default run
    calls = max_iters // variance_interval + 1

    def row(name, seconds, n_tokens=None, note=""):
        """One figure: ms per call, tokens/s where tokens are processed, and the ratio to
        a floor step."""
        tok = f"{n_tokens / seconds:12,.0f}" if n_tokens else " " * 12
        print(f"{name:<34}{seconds * 1e3:11.4g}{tok}{seconds / floor:10.4g}   {note}")

    def header(title):
        print(f"\n{title:<34}{'ms/call':>11}{'tokens/s':>12}{'x floor':>10}")

    header("training step")
    row("floor: fwd + bwd + AdamW", floor, tokens)
    row("standard + uniform t", standard, tokens, "target <= 1.10 x floor")
    row("MIRROR, matched rows", mirror, tokens,
        f"{mirror / standard:.3f} x standard (target <= 1.05)")
    row("pair, matched rows", pair, tokens, f"{pair / standard:.3f} x standard")
    row("P-POTS t (fitted), standard", ppots_step, tokens,
        f"{ppots_step / standard:.3f} x standard")
    header("sampling t for one batch")
    for name, seconds in draw.items():
        row(f"{name}.sample({batch_size})", seconds, None,
            f"{seconds / standard:.3%} of a standard step")
    header("one-off costs")
    row("variance logging (loss + grad)", variance_seconds, None,
        f"x {calls} calls = {calls * variance_seconds / run:.1%} of a {max_iters}-step run "
        f"(target <= 10%)")
    row("P-POTS measure (forwards)", measure_seconds, None,
        f"once = {measure_seconds / run:.1%} of the run")
    row("P-POTS EPR fit (20 L-BFGS starts)", fit_seconds, None,
        f"once = {fit_seconds / run:.1%} of the run")
    row("P-POTS measure + fit", measure_seconds + fit_seconds, None,
        f"once = {(measure_seconds + fit_seconds) / run:.1%} of the run (target <= 5%)")

    prompts = (dataset.prompts(gen_rows, "val", gen) if hasattr(dataset, "prompts")
               else torch.empty(gen_rows, 0, dtype=torch.long)).to(device)
    response_len = dataset.response_len if hasattr(dataset, "prompts") else dataset.seq_len
    header(f"generation ({gen_rows} x {response_len} tokens)")
    model.eval()
    for steps in sorted({1, min(8, response_len), response_len}):
        seconds = timed({"gen": lambda: generate(model, prompts, response_len, steps)},
                        n=max(3, repeats // 5), warm=2)["gen"]
        row(f"{steps} step" + "s" * (steps > 1), seconds, gen_rows * response_len)

if __name__ == "__main__":
    main()
