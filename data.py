"""The tasks and their registry. Tasks are generated offline: every example is a clean sequence
x0 = prompt + response, with a boolean `eligible` marking the maskable (response) positions.

  sort        "31415926=" -> "11234569"       k digits, sorted              (T = 2k + 1)
  add         "123+958="  -> "1081"           n-digit addition, zero-padded (T = 3n + 3)
  twosort     "3141=" -> "1134|4311"      k digits sorted both ways (2k + 1 answer tokens,
                                              T = 3k + 2)
  mix         the pretraining mixture: twosorts and additions of every size, padded with
              '.' to the length of the n-digit twosort (T = 3n + 2)
  text        any UTF-8 file, char-level      no prompt, every char maskable (T = block_size);
              TextTask, in text.py

twosort and mix share one vocabulary (WORKED: the digits, '+', '=', '|', '.'), so a model
pretrained on mix fine-tunes on twosort (train.py --init_from=PATH): the laptop analogue of the
paper's regime, with finetune.py's FiniteTrainSet as the finite SFT set (reproduce_sft.py).

Held-out problems never appear in training: a synthetic problem is in `val` iff a fixed hash of
the problem (its digits as an integer) falls in the bottom 10 %; `batch` rejects the others. The
hash sees only the digits, so a held-out twosort problem is held out of mix too.
Text is split 90/10 by position.

Synthetic problems use exact int64 arithmetic, so their size is capped: a problem's digits, read
as one integer (the split's code), must fit in int64: at most 18 digits, as 10**18 - 1 < 2**63 - 1
< 10**19 - 1. So sort and twosort take 1..18 digits and add 1..9 digits per operand (2n
problem digits; the sum, < 2 * 10**9, is far inside int64). The hash never overflows: (code mod
2147483647) times 2654435761 is below 2**62.3.

Each synthetic task also names the token sets of two supplementary methods (masking.py): ISAD's
critical set S (isad_positions) and SyRM's prompt syntax (syntax_positions, the '+' and '=' tokens).
Text and mix have neither: text has no prompt, mix no single layout.

The registry at the end builds every task, text included: by name (TASKS, get_task), from a
train.py config (task_from_config) or from a checkpoint (task_from_checkpoint). What fine-tuning
adds, the finite training set and the check that a checkpoint fits a task, is in finetune.py.
"""
import torch

from text import TextTask, few_chars, find_data_file

DIGITS = "0123456789+="  # sort and add's vocabulary; [MASK] comes last
WORKED = DIGITS + "|."  # twosort and mix's: '|' parts a response, '.' pads one
VAL_FRACTION = 0.1
MAX_PROBLEM_DIGITS = 18  # a problem's digits as one int64 code: 10**18 - 1 fits, 10**19 - 1 not


def _in_val(code):
    """Deterministic split of the problem space: hash the problem's integer code."""
    h = ((code % 2147483647) * 2654435761) % 4294967291
    return (h % 1000) < int(1000 * VAL_FRACTION)


def _check_num_digits(name, num_digits, largest, why):
    is_int = isinstance(num_digits, int) and not isinstance(num_digits, bool)
    if not is_int or not 1 <= num_digits <= largest:
        raise ValueError(f"task={name} takes num_digits from 1 to {largest} ({why}), "
                         f"got {num_digits!r}")


class SyntheticTask:
    symbols = DIGITS  # the vocabulary; DIGITS is a prefix of WORKED, so the ids agree

    @property
    def vocab_size(self):
        return len(self.symbols) + 1

    @property
    def mask_id(self):
        return len(self.symbols)

    def decode(self, ids):
        return "".join("_" if i == self.mask_id else self.symbols[i] for i in ids.tolist())

    def _problems(self, n, split, generator):
        """n problems (digit tensors) from `split`, by rejection on the split hash."""
        if split not in ("train", "val"):
            raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
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

    def layout(self):
        """The prompt layout as an example and in words:
        ('123+456=', "3 digits, '+', 3 digits, '='")."""
        digits = (torch.arange(self.n_problem_digits) + 1) % 10
        example = self.decode(self._prompt_ids(digits[None])[0])
        runs = []  # [symbol, count] for each run of digits or of one syntax character
        for c in example:
            kind = "digit" if c.isdigit() else c
            if runs and runs[-1][0] == kind == "digit":
                runs[-1][1] += 1
            else:
                runs.append([kind, 1])
        words = [f"{k} digit{'s' * (k > 1)}" if s == "digit" else repr(s) for s, k in runs]
        return example, ", ".join(words)

    def encode(self, s):
        """A prompt string such as '31415926=' -> LongTensor[prompt_len]. It must have the task's
        exact layout (digits where digits go, '+' and '=' where they go); one clear error if not."""
        example, words = self.layout()
        fits = len(s) == len(example) and all(c in "0123456789" if e.isdigit() else c == e
                                              for c, e in zip(s, example))
        if not fits:
            raise ValueError(f"prompt {s!r} does not fit the {self.name} task: expected a prompt "
                             f"like {example} ({words})")
        return torch.tensor([self.symbols.index(c) for c in s], dtype=torch.long)

    def prompts(self, n, split, generator=None):
        """LongTensor[n, prompt_len] of held-out (val) or training prompts."""
        return self._prompt_ids(self._problems(n, split, generator))

    def is_correct(self, prompt_ids, response_ids):
        """BoolTensor[n]: exact match of the whole response."""
        return (response_ids == self.response(prompt_ids)).all(1)

    def isad_positions(self, rule="default"):
        """BoolTensor[T]: ISAD's critical set S, response positions masked more often
        (q = min(1, p + Delta)).
        rule 'first': the first response token, the one right after the answer delimiter '='.
        rule 'default': the task's hardest tokens (`hard`, a slice of the response; see the
        subclasses)."""
        if rule not in ("default", "first"):
            raise ValueError(f"unknown isad_tokens {rule!r}; choose none, default or first")
        S = torch.zeros(self.seq_len, dtype=torch.bool)
        S[self.prompt_len:][slice(0, 1) if rule == "first" else self.hard] = True
        return S

    def syntax_positions(self):
        """BoolTensor[T]: SyRM's syntax tokens, the prompt's non-digits ('+', '='); our prompts have
        a fixed layout, so these are fixed positions."""
        prompt = self._prompt_ids(torch.zeros(1, self.n_problem_digits, dtype=torch.long))[0]
        return torch.cat([prompt >= DIGITS.index("+"),
                          torch.zeros(self.response_len, dtype=torch.bool)])


class SortTask(SyntheticTask):
    """num_digits from 1 to 18 (the problem's digits as one int64 code). One digit is a copy task
    with 10 problems, 1 of them held out; it is allowed as the smallest case, not as a benchmark.
    ISAD default S: the middle half of the response. The middle order statistics have the most
    entropy given the prompt (the ends are the min and max, mostly 0s and 9s), and a partly trained
    model finds them hardest (8 digits, 150 iters: CE 0.5-0.67 nats in the middle vs 0.24-0.28 at
    the ends)."""
    name = "sort"

    def __init__(self, num_digits=8):
        _check_num_digits("sort", num_digits, MAX_PROBLEM_DIGITS,
                          "the digits of a problem form one int64 code for the train/val split")
        self.n_problem_digits, self.prompt_len = num_digits, num_digits + 1
        self.response_len = num_digits
        self.seq_len = 2 * num_digits + 1
        self.hard = slice(num_digits // 4, num_digits - num_digits // 4)

    def _prompt_ids(self, digits):
        return torch.cat([digits, torch.full((len(digits), 1), DIGITS.index("="))], 1)

    def response(self, prompt_ids):
        return prompt_ids[:, :-1].sort(1).values


class AddTask(SyntheticTask):
    """num_digits (per operand) from 1 to 9: the 2n digits of a problem form one int64 code.
    ISAD default S: the first two response tokens, the carry-out and the leading digit of the sum:
    the only ones that depend on every digit of both operands (through the carry chain)."""
    name = "add"

    def __init__(self, num_digits=3):
        _check_num_digits(self.name, num_digits, MAX_PROBLEM_DIGITS // 2,
                          "the 2n digits of a problem form one int64 code for the train/val split")
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


class TwoWaySortTask(SortTask):
    """Sort k digits both ways: ascending, '|', descending: 2k + 1 answer tokens (25 at k = 12), a
    long response whose every token depends on the whole prompt, the laptop stand-in for
    GSM8K's long worked answers. ISAD default S: the middle half of the ascending run, as in
    sort."""
    name, symbols = "twosort", WORKED

    def __init__(self, num_digits=12):
        super().__init__(num_digits)
        self.response_len, self.seq_len = 2 * num_digits + 1, 3 * num_digits + 2

    def response(self, prompt_ids):
        up = prompt_ids[:, :-1].sort(1).values
        bar = torch.full((len(up), 1), WORKED.index("|"))
        return torch.cat([up, bar, up.flip(1)], 1)


class MixTask:
    """The pretraining mixture, fresh data every batch: each row is, with probability 1/2 each, a
    two-way sort (twosort of 2 to n digits) or an addition (1 to n // 2 digits per operand), the
    size uniform within its kind; the response is padded with '.' to T = 3n + 2, the length of
    the n-digit twosort, so one model takes both. The padding is part of the response
    (eligible): the model learns where an answer ends, as LLaDA pads its SFT answers with EOS.
    Every prompt names its answer's format (a '+' or not, and its length), which is why plain
    sort is not in the mix: its prompts are twosort's. It has no single prompt layout, so no
    held-out accuracy (train.py logs the val ELBO) and no ISAD or SyRM token sets."""
    name, symbols = "mix", WORKED
    vocab_size, mask_id = len(WORKED) + 1, len(WORKED)

    def __init__(self, num_digits=12):
        _check_num_digits("mix", num_digits, MAX_PROBLEM_DIGITS, "it pads to the n-digit twosort")
        self.seq_len = 3 * num_digits + 2
        kinds = [[TwoWaySortTask(k) for k in range(2, num_digits + 1)],
                 [AddTask(k) for k in range(1, max(1, num_digits // 2) + 1)]]
        self.parts = [part for kind in kinds for part in kind]
        self.weights = torch.tensor([1 / (2 * len(kind)) for kind in kinds for _ in kind])

    def batch(self, n, split, generator=None):
        """(x0, eligible) [n, T]: row i from part `which[i]`, padded with '.' (eligible)."""
        which = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        x0 = torch.full((n, self.seq_len), WORKED.index("."))
        eligible = torch.ones(n, self.seq_len, dtype=torch.bool)
        for j, part in enumerate(self.parts):
            rows = (which == j).nonzero().squeeze(1)
            if len(rows):
                x, e = part.batch(len(rows), split, generator)
                x0[rows, :x.shape[1]], eligible[rows, :x.shape[1]] = x, e
        return x0, eligible

    def decode(self, ids):
        return "".join("_" if i == self.mask_id else WORKED[i] for i in ids.tolist())

    def isad_positions(self, rule="default"):
        raise ValueError("task=mix has no single answer layout for ISAD; use --isad_tokens=none")

    def syntax_positions(self):
        raise ValueError("task=mix has no single prompt layout for SyRM; use --syrm_alpha=1")


TASKS = {"sort": SortTask, "add": AddTask, "twosort": TwoWaySortTask, "mix": MixTask,
         "text": TextTask}


def get_task(name, **kw):
    """Build a task by name: get_task('sort', num_digits=8),
    get_task('text', data_path=..., block_size=256)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name](**kw)


def task_from_config(config, vocab=None):
    """The task a train.py config describes (checkpoints store the config). vocab: a text run's
    stored vocabulary (ckpt['vocab'], its TextTask's `.chars`), passed on as TextTask's `chars`;
    synthetic tasks have a fixed vocabulary and ignore it."""
    name = config["task"]
    if name == "text":
        return get_task(name, data_path=config["data_path"], block_size=config["block_size"],
                        chars=vocab)
    return get_task(name, num_digits=config["num_digits"])


def task_from_checkpoint(ckpt, need_data=False):
    """The checkpoint's task. A text checkpoint with its vocabulary (ckpt["vocab"]) needs no data
    file: if the file is gone the stored vocabulary serves; if it is there, its vocabulary must be
    the stored one. Older text checkpoints and synthetic tasks are rebuilt from the config alone.
    need_data=True (resuming training): the data file must be there."""
    config, vocab = ckpt["config"], ckpt.get("vocab")
    if config["task"] != "text" or vocab is None:
        return task_from_config(config)
    if find_data_file(config["data_path"]) is None and not need_data:
        return task_from_config(dict(config, data_path=""), vocab=vocab)
    task = task_from_config(config)
    if task.chars != list(vocab):
        added, lacking = set(task.chars) - set(vocab), set(vocab) - set(task.chars)
        raise ValueError(f"data file {config['data_path']} does not have the checkpoint's "
                         f"vocabulary of {len(vocab)} characters (only in the file: "
                         f"{few_chars(added)}; only in the checkpoint: {few_chars(lacking)}): "
                         "use the training file (sampling needs no data file at all)")
    return task
