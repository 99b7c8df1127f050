"""The char-level text task: any UTF-8 file is a corpus, one token per character, no prompt and
every position maskable, split 90/10 by position (the first 90 % trains). The repository ships
one, data/tinyshakespeare.txt (public domain, 1.1 MB), so text runs work offline. A checkpoint
stores its vocabulary (TextTask's `.chars`), so sampling from it needs no data file.
"""
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def few_chars(chars, limit=10):
    """A few characters for an error message: 'QZ!', or 'abcdefghij' and 5 more."""
    chars = sorted(chars)
    more = f" and {len(chars) - limit} more" if len(chars) > limit else ""
    return f"{''.join(chars[:limit])!r}{more}"


def find_data_file(path):
    """Where a data file is: `path` itself if it is a file (relative to the current directory),
    else a relative `path` under the repository (the folder of text.py), else None."""
    if os.path.isfile(path):
        return path
    in_repo = os.path.join(HERE, path)
    return in_repo if not os.path.isabs(path) and os.path.isfile(in_repo) else None


class TextTask:
    """Char-level text from any UTF-8 file; all positions maskable; 90/10 split by position.

    data_path: the file; a relative path is looked up in the current directory, then in the
    repository (so data/tinyshakespeare.txt works from anywhere). block_size: the window, >= 2.
    chars: the vocabulary a checkpoint stored (its TextTask's `.chars`, the sorted characters of
    its training file). Without it the vocabulary is the file's own characters; with it the
    vocabulary is exactly `chars` (mask id = len(chars)) and a file with any other character is
    refused. With `chars` the file may be left out (data_path=""): such a task encodes, decodes
    and generates (vocab_size, mask_id, block_size), but has no splits and `batch` refuses.
    """

    def __init__(self, data_path=None, block_size=256, chars=None):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
            raise ValueError(f"task=text needs block_size >= 2, got {block_size!r}: a 1-character "
                             "window gives an ARM no next-token target and an MDM no context, and "
                             "leaves no room to generate after a 1-character prompt")
        if chars is not None:
            chars = list(chars)
            single = all(isinstance(c, str) and len(c) == 1 for c in chars)
            if not chars or not single or len(set(chars)) < len(chars):
                raise ValueError("a stored text vocabulary must be a non-empty list of distinct "
                                 "characters")
        if not data_path and chars is None:
            raise ValueError("task=text needs --data_path=FILE (any UTF-8 text file)")
        self.split = None
        self.seq_len = self.block_size = block_size
        text = self._read(data_path) if data_path else None
        self.chars = chars if chars is not None else sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size, self.mask_id = len(self.chars) + 1, len(self.chars)
        if text is None:
            return
        unknown = set(text) - set(self.stoi)
        if unknown:
            raise ValueError(f"data file {data_path} has {len(unknown)} characters not in the "
                             f"stored vocabulary: {few_chars(unknown)}")
        data = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        n_train = int(0.9 * len(data))
        self.split = {"train": data[:n_train], "val": data[n_train:]}
        for name, part in self.split.items():
            if len(part) < block_size + 1:
                raise ValueError(f"data file {data_path} is too short: its {name} split has "
                                 f"{len(part)} chars, block_size+1 = {block_size + 1} needed "
                                 "(use a longer file or a smaller block_size)")

    @property
    def symbols(self):  # the vocabulary, as the synthetic tasks name theirs
        return self.chars

    @staticmethod
    def _read(data_path):
        path = find_data_file(data_path)
        if path is None:
            raise ValueError(f"data file {data_path} not found")
        try:
            text = open(path, encoding="utf-8").read()
        except UnicodeDecodeError as e:
            raise ValueError(f"data file {data_path} is not UTF-8 text ({e.reason} at byte "
                             f"{e.start})") from None
        except OSError as e:
            raise ValueError(f"cannot read data file {data_path}: {e.strerror or e}") from None
        if not text:
            raise ValueError(f"data file {data_path} is empty")
        return text

    def batch(self, n, split, generator=None):
        if self.split is None:
            raise ValueError("this text task has no data file "
                             "(it was built from a stored vocabulary, for sampling); "
                             "give --data_path=FILE to train or evaluate")
        if split not in self.split:
            raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
        data = self.split[split]
        start = torch.randint(0, len(data) - self.block_size, (n,), generator=generator)
        x0 = data[start[:, None] + torch.arange(self.block_size)]
        return x0, torch.ones_like(x0, dtype=torch.bool)

    def encode(self, s):
        unknown = set(s) - set(self.stoi)
        if unknown:
            raise ValueError(f"prompt has characters not in the vocabulary: {few_chars(unknown)}")
        return torch.tensor([self.stoi[c] for c in s], dtype=torch.long)

    def prompt_ids(self, prompt="", causal=False):
        """(LongTensor ids a text sample starts from, a note or None). A prompt given must be in
        the vocabulary and shorter than block_size (ValueError). No prompt: a newline, the text's
        usual boundary, if the vocabulary has one; else nothing, an unconditional sample (an ARM,
        which needs a first token, starts from the vocabulary's first character), with a note
        that says so."""
        if prompt:
            ids = self.encode(prompt)
            if len(ids) >= self.block_size:
                raise ValueError(f"the prompt is {len(ids)} chars; it must be shorter than "
                                 f"block_size={self.block_size}")
            return ids, None
        if "\n" in self.stoi:
            return self.encode("\n"), None
        if causal:
            return self.encode(self.chars[0]), (f"this corpus has no newline: the sample starts "
                                                f"from its first character {self.chars[0]!r}")
        return torch.zeros(0, dtype=torch.long), "this corpus has no newline: the sample is unconditional"

    def decode(self, ids):
        return "".join("_" if i == self.mask_id else self.chars[i] for i in ids.tolist())

    def isad_positions(self, rule="default"):
        raise ValueError("task=text has no answer delimiter or critical tokens for ISAD; "
                         "use --isad_tokens=none")

    def syntax_positions(self):
        raise ValueError("task=text has no prompt, so every token is already maskable and SyRM has "
                         "no syntax to add; use --syrm_alpha=1")
