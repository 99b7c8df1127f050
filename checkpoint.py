"""The run directory (out_dir) and what train.py guarantees about it; a run's start (scratch,
resume, fine-tune), save and restore; the log and its window.

  ckpt.pt     written atomically: a uniquely named temporary file, flushed to disk (fsync), then
              renamed over the old one, so a kill or a full disk at any moment leaves the previous
              checkpoint loadable; never written with non-finite weights. Plain types and tensors
              only, so loading is weights_only (a malicious pickle is refused).
  log.jsonl   one JSON record per line; on resume the records after the checkpoint's iteration
              (written before a crash) are dropped, so the resumed run does not log them twice.
  train.lock  held (flock) by the live run: a second run in the same out_dir stops with one line.
Nothing in out_dir is created, truncated or written before the whole configuration is validated.
"""
import io
import json
import os
import random
from dataclasses import asdict

import numpy as np
import torch

import train_config
from configurator import given_keys
from model import ModelConfig, Transformer, check_device

# config keys that define the model, the data or the estimator: a resumed run must keep them
IMMUTABLE = ("model_type", "n_layer", "n_head", "n_embd", "dropout", "bias", "task", "num_digits",
             "data_path", "block_size", "train_size", "batch_size", "seed", "t_sampler", "masking",
             "matched_compute", "ppots_fit_iter", "ppots_refit_every", "ppots_online", "ppots_fit",
             "ppots_support", "isad_tokens", "isad_delta", "syrm_alpha", "cv_bins", "cv_eta",
             "weight_ema_decay")
# machine- and call-specific keys that a checkpoint never imposes on the run that resumes it
NOT_RESUMED = ("out_dir", "init_from", "device", "dtype", "compile")
RENAMED = {"ema_bins": "cv_bins", "ema_eta": "cv_eta", "ema_decay": "weight_ema_decay"}


def load_checkpoint(path, device="cpu", raw=False, resume=False):
    """(model in eval mode, checkpoint dict) from a train.py checkpoint, checked once, here, before
    the caller uses any of it (check_checkpoint): a ValueError names the file and what is wrong
    (missing, unreadable, not a train.py checkpoint, a config train.py's checks refuse, a shape
    that does not build, non-finite weights; resume=True: also the optimizer, sampler and random
    streams a resume restores), or a device this machine lacks.
    A checkpoint trained with weight_ema_decay > 0 gives its EMA weights (ckpt['ema']): that is the
    model train.py evaluates, so sample.py and variance.py see it too. raw=True gives the trained
    weights (resume). Config keys of older checkpoints are renamed (RENAMED)."""
    check_device(device)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} not found "
                         f"(train first: python train.py --out_dir=...)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, a pickle that is not plain data
        raise ValueError(f"checkpoint {path} is corrupt or not a train.py checkpoint "
                         f"({type(e).__name__})") from None
    try:
        model = check_checkpoint(ckpt, resume)
        model.load_state_dict(ckpt["ema"] if "ema" in ckpt and not raw else ckpt["model"])
    except ValueError as e:
        raise ValueError(f"checkpoint {path} {e}") from None
    except (TypeError, RuntimeError, KeyError) as e:
        raise ValueError(f"checkpoint {path} does not match this model code "
                         f"({type(e).__name__})") from None
    return model.to(device).eval(), ckpt


def check_checkpoint(ckpt, resume=False):
    """The Transformer a checkpoint dict describes (weights not loaded), after checking it: the
    keys train.py writes and their types, a config that train_config.check accepts and that holds
    every IMMUTABLE key, finite weights, and for a resume the optimizer, sampler, random streams
    and iteration. Renames older config keys in place. ValueError('is/has ...') otherwise."""
    if not isinstance(ckpt, dict):
        raise ValueError("is not a train.py checkpoint (not a dict)")
    need = {"model_args": dict, "model": dict, "config": dict}
    if resume:
        need.update(optimizer=dict, sampler=dict, rng=dict, iter_num=int)
    for key, kind in need.items():
        if not isinstance(ckpt.get(key), kind) or isinstance(ckpt[key], bool):
            raise ValueError(f"is not a train.py checkpoint: its {key!r} is "
                             f"{'missing' if key not in ckpt else type(ckpt[key]).__name__}")
    ckpt["config"] = config = {RENAMED.get(k, k): v for k, v in ckpt["config"].items()}
    missing = [k for k in IMMUTABLE if k not in config]
    if missing:
        raise ValueError(f"has a config without {', '.join(missing)}")
    try:
        train_config.check({**train_config.defaults(), **config})
    except ValueError as e:
        raise ValueError(f"has a config that train.py refuses: {e}") from None
    try:
        model = Transformer(ModelConfig(**ckpt["model_args"]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"has a model shape that does not build ({e})") from None
    for name in ("model", "ema"):
        weights = ckpt.get(name, {})
        if not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise ValueError(f"has {name} weights that are not tensors")
        bad = [k for k, v in weights.items() if v.is_floating_point() and not v.isfinite().all()]
        if bad:
            raise ValueError(f"has non-finite {name} weights ({bad[0]})")
    if resume:
        if ckpt["iter_num"] < 0:
            raise ValueError(f"has iteration {ckpt['iter_num']}")
        wants = dict(rng=("torch", "data", "python", "numpy"), optimizer=("state", "param_groups"),
                     sampler=("name",))
        wants.update((k, ()) for k, on in (("ema", config["weight_ema_decay"]),
                                           ("loss_cv", config["cv_bins"]),
                                           ("train_set", config["train_size"])) if on)
        for key, parts in wants.items():
            if not isinstance(ckpt.get(key), dict) or any(p not in ckpt[key] for p in parts):
                raise ValueError(f"cannot resume: its {key!r} is missing or incomplete")
    return model


def resumed_config(config, ckpt, given):
    """The config of a resumed run: the checkpoint's, with the flags given on the command line
    (`given`: their names) on top. A given flag that would change an IMMUTABLE key is refused;
    NOT_RESUMED keys keep this call's values."""
    saved = ckpt["config"]
    for key in IMMUTABLE:
        if key in given and key in saved and config[key] != saved[key]:
            raise ValueError(f"--{key}={config[key]!r} differs from the checkpoint's "
                             f"{saved[key]!r}: it cannot change on resume "
                             f"(start a new out_dir instead)")
    keep = set(given) | set(NOT_RESUMED)
    return {k: config[k] if k in keep or k not in saved else saved[k] for k in config}


def finetune_config(config, ckpt, given, path):
    """The config of a fine-tuning run (init_from=path): the model's shape (model_type, n_layer,
    n_head, n_embd, bias) is the checkpoint's; a shape flag given on the command line (`given`)
    that differs is refused. Everything else is this run's: task, data, method, schedule."""
    args = ckpt["model_args"]
    shape = dict(model_type="arm" if args["causal"] else "mdm",
                 **{k: args[k] for k in ("n_layer", "n_head", "n_embd", "bias")})
    for key, value in shape.items():
        if key in given and config[key] != value:
            raise ValueError(f"--{key}={config[key]!r} differs from {path}'s {value!r}: a "
                             f"fine-tuned model keeps its pretrained shape")
    return {**config, **shape}


def start_config(config, argv):
    """(config, resume, pretrained) of a run with init_from: 'scratch' -> (config, None, None);
    'resume' -> the checkpoint in out_dir with its config as the base (resumed_config), resume =
    (its trained model, its dict); a checkpoint's path -> fine-tuning (finetune_config),
    pretrained = (its evaluated model, its dict). argv: the command line, to tell given flags."""
    init_from = config["init_from"]
    if init_from == "resume":
        model, ckpt = load_checkpoint(os.path.join(config["out_dir"], "ckpt.pt"), raw=True,
                                      resume=True)
        config = resumed_config(config, ckpt, given_keys(argv))
        if config["max_iters"] <= ckpt["iter_num"]:
            raise ValueError(f"the checkpoint is at iteration {ckpt['iter_num']}: --max_iters="
                             f"{config['max_iters']} leaves nothing to train "
                             f"(raise it to continue)")
        return config, (model, ckpt), None
    if init_from != "scratch":
        if not os.path.isfile(init_from):
            raise ValueError(f"--init_from must be 'scratch', 'resume' or a checkpoint's path; "
                             f"{init_from!r} is none of them")
        model, ckpt = load_checkpoint(init_from)
        return finetune_config(config, ckpt, given_keys(argv), init_from), None, (model, ckpt)
    return config, None, None


def save_run(path, model, optimizer, iter_num, config, sampler, data_gen, dataset, ema=None,
             loss_cv=None):
    """Everything a resume needs, plain types and tensors only, written by save_checkpoint: the
    model, optimizer, sampler, random streams, and what is on (weight EMA, control variate, a text
    task's vocabulary, a finite training set's epoch state)."""
    state = {"model_args": asdict(model.config), "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "iter_num": iter_num, "config": config,
             "sampler": sampler.state_dict(), "rng": rng_state(data_gen)}
    if ema is not None:
        state.update(ema=ema.module.state_dict(), ema_n=torch.tensor(ema.n_averaged))
    if loss_cv is not None:
        state["loss_cv"] = loss_cv.state_dict()
    if hasattr(dataset, "chars"):  # text: the vocabulary, so sampling does not need the data file
        state["vocab"] = dataset.chars
    if config["train_size"]:
        state["train_set"] = dataset.state_dict()
    save_checkpoint(path, state, model)


def restore_run(ckpt, optimizer, config, data_gen, dataset, ema=None, loss_cv=None):
    """Undo save_run on a freshly built run (the model's weights are already loaded); the
    optimizer takes this run's betas and weight decay. Returns the checkpoint's iteration."""
    optimizer.load_state_dict(ckpt["optimizer"])
    for group in optimizer.param_groups:  # the saved state carries the old hyperparameters
        group.update(betas=(config["beta1"], config["beta2"]),
                     weight_decay=config["weight_decay"] if group["weight_decay"] else 0.0)
    if ema is not None and "ema" in ckpt:
        ema.module.load_state_dict(ckpt["ema"])
        ema.n_averaged = int(ckpt["ema_n"])
    if loss_cv is not None and "loss_cv" in ckpt:
        loss_cv.load_state_dict(ckpt["loss_cv"])
    set_rng_state(ckpt["rng"], data_gen)
    if config["train_size"]:
        dataset.load_state_dict(ckpt["train_set"])
    return ckpt["iter_num"]


def save_checkpoint(path, state, model):
    """Write `state` to `path` atomically and durably (see the module docstring). Refuses a model
    with non-finite weights; a write error (full disk, read-only) leaves the old file untouched."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise ValueError(f"refusing to write non-finite weights over {path}")
    tmp = f"{path}.{os.getpid()}.tmp"
    data = io.BytesIO()  # serialised first, so that a full disk is an OSError of the write below
    torch.save(state, data)
    try:
        with open(tmp, "wb") as f:
            f.write(data.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, a read-only folder, Ctrl-C: no half-written file
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(e, OSError):
            raise
        raise ValueError(f"cannot write checkpoint {path}: {e.strerror or e}; the previous one is "
                         f"unchanged") from None


def lock_out_dir(out_dir):
    """Create out_dir if needed and hold its lock for the life of the process (returns the open lock
    file, to be kept referenced); then remove the *.tmp files of an earlier run's killed write.
    ValueError if out_dir cannot be used or a live run holds it."""
    if not out_dir:
        raise ValueError("--out_dir is empty; name a directory")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out_dir={out_dir} is a file, not a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(os.path.join(out_dir, "train.lock"), "a")
    except OSError as e:
        raise ValueError(f"cannot write to --out_dir={out_dir}: {e.strerror or e}") from None
    try:
        import fcntl
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no flock (Windows): no protection against a second run
        pass
    except OSError:
        lock.close()
        raise ValueError(f"another run is using --out_dir={out_dir} (it holds {lock.name}); "
                         f"wait for it or choose another out_dir") from None
    for name in os.listdir(out_dir):  # left by a write that was killed: no live run holds them
        if name.endswith(".tmp"):
            os.remove(os.path.join(out_dir, name))
    return lock


def start_log(path, resume_iter=None):
    """Make log.jsonl ready for appending: emptied for a new run; on resume, cut to the records up
    to the checkpoint's iteration (rewritten atomically; a torn last line is dropped too)."""
    if resume_iter is None or not os.path.exists(path):
        open(path, "w").close()
        return
    keep = []
    for line in open(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("iter", 0) <= resume_iter:
            keep.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def append_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def rng_state(data_gen):
    """Every random stream of a training run, for its checkpoint: torch (t, masks, init), CUDA, the
    x0 stream's own generator, python and numpy; plain types and tensors only (weights_only)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "data": data_gen.get_state(),
             "python": random.getstate(),
             "numpy": (torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state, data_gen):
    """Undo rng_state: a resumed run draws exactly the numbers the uninterrupted run would have."""
    torch.set_rng_state(state["torch"])
    data_gen.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np.random.set_state(("MT19937", state["numpy"][0].numpy().astype(np.uint32),
                         *state["numpy"][1:]))
    random.setstate(state["python"])


class LogWindow:
    """The training metrics of the steps since the last log record. add() keeps them as device
    tensors (no host sync); record() reads them once, at a log interval, and starts a new window.
    with_raw: also the plain mean w l under a control variate (loss_raw)."""

    def __init__(self, with_raw=False):
        self.with_raw = with_raw
        self.reset()

    def reset(self):
        self.t, self.w, self.loss, self.norm, self.raw, self.clipped = [], [], 0.0, 0.0, 0.0, 0

    def add(self, t, w, loss, grad_norm, clipped, raw=0.0):
        """One step: its t and w (CPU), loss (the reported mean w l), the gradient norm before
        clipping, whether it was clipped (a bool tensor), and the plain loss; device tensors."""
        self.t.append(t)
        self.w.append(w)
        self.loss, self.norm = self.loss + loss.detach(), self.norm + grad_norm
        self.clipped, self.raw = self.clipped + clipped, self.raw + raw

    def record(self, iter_num, lr):
        """The window's log record: means of loss, gradient norm, clipped steps and w, the last
        lr, and a 10-bin histogram of t; then the window is emptied."""
        n = len(self.t)
        record = {"iter": iter_num, "loss": self.loss.item() / n, "grad_norm": self.norm.item() / n,
                  "clip_frac": int(self.clipped) / n, "lr": lr,
                  "w_mean": torch.cat(self.w).mean().item(),
                  "t_hist": torch.histc(torch.cat(self.t), bins=10, min=0, max=1).int().tolist()}
        if self.with_raw:
            record["loss_raw"] = torch.as_tensor(self.raw).item() / n
        self.reset()
        return record
