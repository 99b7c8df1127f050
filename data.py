"""Tasks, generated offline: every example is a clean sequence x0 = prompt + response, with a
boolean `eligible` marking the maskable (response) positions.

  sort  "31415926=" -> "11234569"       k digits, sorted            (T = 2k + 1)
  add   "123+958="  -> "1081"           n-digit addition, zero-padded (T = 3n + 3)
  text  any UTF-8 file, char-level      no prompt, every char maskable (T = block_size)

Held-out problems never appear in training: a synthetic problem is in `val` iff a fixed hash of
the problem (its digits as an integer) falls in the bottom 10 %; `batch` rejects the others.
Text is split 90/10 by position.

Each synthetic task also names the token sets of two supplementary methods (masking.py): ISAD's
critical set S (isad_positions) and SyRM's prompt syntax (syntax_positions, the '+' and '=' tokens).
Text has neither: it has no prompt and no answer to single out.
"""
import os

import torch

from configurator import fail

DIGITS = "0123456789+="  # the synthetic vocabulary; [MASK] comes last
VAL_FRACTION = 0.1


def _in_val(code):
    """Deterministic split of the problem space: hash the problem's integer code."""
    h = ((code % 2147483647) * 2654435761) % 4294967291
    return (h % 1000) < int(1000 * VAL_FRACTION)


class SyntheticTask:
    vocab_size = len(DIGITS) + 1
    mask_id = len(DIGITS)

    def decode(self, ids):
        return "".join("_" if i == self.mask_id else DIGITS[i] for i in ids.tolist())

    def _problems(self, n, split, generator):
        """n problems (digit tensors) from `split`, by rejection on the split hash."""
        if split not in ("train", "val"):
            fail(f"unknown split {split!r}; use 'train' or 'val'")
        out, have = [], 0
        while have < n:
            digits = torch.randint(0, 10, (4 * n + 16, self.n_problem_digits), generator=generator)
            code = (digits * 10 ** torch.arange(self.n_problem_digits)).sum(1)
            keep = digits[_in_val(code) == (split == "val")]
            out.append(keep)
            have += len(keep)
        return torch.cat(out)[:n]

    def batch(self, n, split, generator=None):
        """(x0 LongTensor[n, T], eligible BoolTensor[n, T]); eligible = the response positions."""
        prompt = self._prompt_ids(self._problems(n, split, generator))
        x0 = torch.cat([prompt, self.response(prompt)], 1)
        eligible = torch.zeros_like(x0, dtype=torch.bool)
        eligible[:, self.prompt_len:] = True
        return x0, eligible

    def encode(self, s):
        """A prompt string such as '31415926=' -> LongTensor[prompt_len]; one clear error if malformed."""
        bad = sorted(set(s) - set(DIGITS))
        if bad or len(s) != self.prompt_len:
            fail(f"prompt {s!r} is not a {self.prompt_len}-character problem over {DIGITS!r}")
        return torch.tensor([DIGITS.index(c) for c in s], dtype=torch.long)

    def prompts(self, n, split, generator=None):
        """LongTensor[n, prompt_len] of held-out (val) or training prompts."""
        return self._prompt_ids(self._problems(n, split, generator))

    def is_correct(self, prompt_ids, response_ids):
        """BoolTensor[n]: exact match of the whole response."""
        return (response_ids == self.response(prompt_ids)).all(1)

    def isad_positions(self, rule="default"):
        """BoolTensor[T]: ISAD's critical set S, response positions masked more often (q = min(1, p + Delta)).
        rule 'first': the first response token, the one right after the answer delimiter '='.
        rule 'default': the task's hardest tokens (`hard`, a slice of the response; see the subclasses)."""
        if rule not in ("default", "first"):
            fail(f"unknown isad_tokens {rule!r}; choose none, default or first")
        S = torch.zeros(self.seq_len, dtype=torch.bool)
        S[self.prompt_len:][slice(0, 1) if rule == "first" else self.hard] = True
        return S

    def syntax_positions(self):
        """BoolTensor[T]: SyRM's syntax tokens, the prompt's non-digits ('+', '='); our prompts have a
        fixed layout, so these are fixed positions."""
        prompt = self._prompt_ids(torch.zeros(1, self.n_problem_digits, dtype=torch.long))[0]
        return torch.cat([prompt >= DIGITS.index("+"), torch.zeros(self.response_len, dtype=torch.bool)])


class SortTask(SyntheticTask):
    """ISAD default S: the middle half of the response. The middle order statistics have the most
    entropy given the prompt (the ends are the min and max, mostly 0s and 9s), and a partly trained model
    finds them hardest (8 digits, 150 iters: CE 0.5-0.67 nats in the middle vs 0.24-0.28 at the ends)."""

    def __init__(self, num_digits=8):
        self.n_problem_digits, self.prompt_len = num_digits, num_digits + 1
        self.response_len = num_digits
        self.seq_len = 2 * num_digits + 1
        self.hard = slice(num_digits // 4, num_digits - num_digits // 4)

    def _prompt_ids(self, digits):
        return torch.cat([digits, torch.full((len(digits), 1), DIGITS.index("="))], 1)

    def response(self, prompt_ids):
        return prompt_ids[:, :-1].sort(1).values


class AddTask(SyntheticTask):
    """ISAD default S: the first two response tokens, the carry-out and the leading digit of the sum:
    the only ones that depend on every digit of both operands (through the carry chain)."""

    def __init__(self, num_digits=3):
        self.n = num_digits
        self.n_problem_digits, self.prompt_len = 2 * num_digits, 2 * num_digits + 2
        self.response_len = num_digits + 1
        self.seq_len = 3 * num_digits + 3
        self.hard = slice(0, 2)

    def _prompt_ids(self, digits):
        n, col = self.n, lambda c: torch.full((len(digits), 1), DIGITS.index(c))
        return torch.cat([digits[:, :n], col("+"), digits[:, n:], col("=")], 1)

    def response(self, prompt_ids):
        n, place = self.n, 10 ** torch.arange(self.n - 1, -1, -1)
        a = (prompt_ids[:, :n] * place).sum(1)
        b = (prompt_ids[:, n + 1:2 * n + 1] * place).sum(1)
        out_place = 10 ** torch.arange(n, -1, -1)
        return ((a + b)[:, None] // out_place) % 10


class TextTask:
    """Char-level text from any UTF-8 file; all positions maskable; 90/10 split by position."""

    def __init__(self, data_path=None, block_size=256):
        if not data_path:
            fail("task=text needs --data_path=FILE (any UTF-8 text file)")
        if not os.path.isfile(data_path):
            fail(f"data file {data_path} not found")
        try:
            text = open(data_path, encoding="utf-8").read()
        except UnicodeDecodeError as e:
            fail(f"data file {data_path} is not UTF-8 text ({e.reason} at byte {e.start})")
        if not text:
            fail(f"data file {data_path} is empty")
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size, self.mask_id = len(self.chars) + 1, len(self.chars)
        self.seq_len = self.block_size = block_size
        data = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        n_train = int(0.9 * len(data))
        self.split = {"train": data[:n_train], "val": data[n_train:]}
        for name, part in self.split.items():
            if len(part) < block_size + 1:
                fail(f"data file {data_path} is too short: its {name} split has {len(part)} chars, "
                     f"block_size+1 = {block_size + 1} needed (use a longer file or a smaller block_size)")

    def batch(self, n, split, generator=None):
        data = self.split[split]
        start = torch.randint(0, len(data) - self.block_size, (n,), generator=generator)
        x0 = data[start[:, None] + torch.arange(self.block_size)]
        return x0, torch.ones_like(x0, dtype=torch.bool)

    def encode(self, s):
        unknown = sorted(set(s) - set(self.stoi))
        if unknown:
            fail(f"prompt has characters not in the vocabulary: {''.join(unknown)!r}")
        return torch.tensor([self.stoi[c] for c in s], dtype=torch.long)

    def decode(self, ids):
        return "".join("_" if i == self.mask_id else self.chars[i] for i in ids.tolist())

    def isad_positions(self, rule="default"):
        fail("task=text has no answer delimiter or critical tokens for ISAD; use --isad_tokens=none")

    def syntax_positions(self):
        fail("task=text has no prompt, so every token is already maskable and SyRM has no syntax to add; "
             "use --syrm_alpha=1")


TASKS = {"sort": SortTask, "add": AddTask, "text": TextTask}


def get_task(name, **kw):
    """Build a task by name: get_task('sort', num_digits=8), get_task('text', data_path=..., block_size=256)."""
    if name not in TASKS:
        fail(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name](**kw)


def task_from_config(config):
    """The task a train.py config describes (checkpoints store the config)."""
    name = config["task"]
    if name == "text":
        return get_task(name, data_path=config["data_path"], block_size=config["block_size"])
    return get_task(name, num_digits=config["num_digits"])
