"""What fine-tuning (SFT: train.py --init_from=PATH --train_size=N) adds to the data.

  FiniteTrainSet, training_set  a finite training set: N examples of the task drawn once with a
                                fixed seed (TRAIN_SET_SEED, the same set for every run seed) and
                                visited in epochs; --train_size=N also works from scratch
  check_fits                    the check that a pretrained checkpoint fits the task: the same
                                vocabulary, and sequences no longer than its model's block_size
"""
import torch

from data import task_from_checkpoint
from text import TextTask, few_chars

TRAIN_SET_SEED = 20_251_122  # draws the finite training set: the same set for every run seed


class FiniteTrainSet:
    """A finite training set (train.py --train_size=N): N examples of `task`, drawn once from its
    train split with TRAIN_SET_SEED, so the set is the same for every run seed.

      next_batch(n, generator)  the training stream, in epochs: each epoch is a fresh permutation
                                drawn from `generator` (train.py's x0 stream), and each call hands
                                out the next n examples, crossing into the next epoch where one
                                ends: every example once per epoch
      batch(n, "train", g)      n examples drawn uniformly from the set (i.i.d.), for anything
                                else that reads the training distribution (P-POTS's curve,
                                variance.py): it leaves the epoch stream untouched
      batch(n, "val", g)        the task's held-out problems, never in the set
    The prompts, vocabulary and layout are the task's own. State (for resume): the permutation,
    the position in it, the examples handed out.
    """

    def __init__(self, task, size):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"a finite training set needs size >= 1, got {size!r}")
        if isinstance(task, TextTask):
            raise ValueError("task=text is already a finite corpus: use --train_size=0")
        self.task = task
        self.x0, self.eligible = task.batch(size, "train",
                                            torch.Generator().manual_seed(TRAIN_SET_SEED))
        self.order, self.pos, self.seen = torch.arange(size), size, 0  # an epoch starts first

    def __getattr__(self, name):  # everything but the train split is the task's
        if name == "task":
            raise AttributeError(name)
        return getattr(self.task, name)

    @property
    def epoch(self):
        """Epochs completed, fractional: examples handed out by next_batch / N."""
        return self.seen / len(self.x0)

    def next_batch(self, n, generator=None):
        take, have = [], 0
        while have < n:
            if self.pos == len(self.order):
                self.order, self.pos = torch.randperm(len(self.x0), generator=generator), 0
            part = self.order[self.pos:self.pos + n - have]
            take.append(part)
            self.pos, have = self.pos + len(part), have + len(part)
        idx = torch.cat(take)
        self.seen += n
        return self.x0[idx], self.eligible[idx]

    def batch(self, n, split, generator=None):
        if split != "train":
            return self.task.batch(n, split, generator)
        idx = torch.randint(len(self.x0), (n,), generator=generator)
        return self.x0[idx], self.eligible[idx]

    def state_dict(self):
        return {"order": self.order, "pos": self.pos, "seen": self.seen}

    def load_state_dict(self, sd):
        self.order, self.pos, self.seen = sd["order"], sd["pos"], sd["seen"]


def training_set(config, task):
    """The task train.py trains on: `task` itself, or its FiniteTrainSet of config["train_size"]
    examples (0 = fresh examples every step)."""
    return FiniteTrainSet(task, config["train_size"]) if config.get("train_size") else task


def check_fits(task, name, ckpt, path):
    """ValueError unless task `name` fits the model of checkpoint `ckpt` (train.py
    --init_from=path): the same vocabulary, symbol for symbol, and sequences no longer than the
    model's block_size."""
    have, want = list(task_from_checkpoint(ckpt).symbols), list(task.symbols)
    if have != want:
        raise ValueError(f"{path} was trained on task={ckpt['config']['task']}, whose vocabulary "
                         f"({len(have)} symbols: {few_chars(have, 16)}) is not task={name}'s "
                         f"({len(want)}: {few_chars(want, 16)}): fine-tune on a task with the "
                         f"checkpoint's vocabulary (e.g. mix -> twosort)")
    block = ckpt["model_args"]["block_size"]
    if task.seq_len > block:
        raise ValueError(f"task={name} has sequences of {task.seq_len} tokens, {path}'s model "
                         f"takes at most {block}: fine-tune on shorter sequences")
