"""Draft tests for the shipped corpus, stored text vocabularies, sampling temperature and bad input
(to be folded into test_all.py). Run: python -m pytest -q test_textdata_draft.py"""
import hashlib
import os
import random
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import sample
from data import AddTask, SortTask, TextTask, _in_val, get_task
from model import ModelConfig, Transformer
from sample import generate, text_sample

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TEXT = "the quick brown fox jumps over the lazy dog.\n" * 20


def tiny_model(vocab_size, block_size, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab_size, mask_id=vocab_size - 1, block_size=block_size,
                                   n_layer=1, n_head=2, n_embd=32)).eval()


def write_ckpt(out_dir, config, vocab_size, block_size, vocab=None):
    """A checkpoint as train.py writes one, as far as sample.py reads it: a tiny random model."""
    os.makedirs(out_dir, exist_ok=True)
    model = tiny_model(vocab_size, block_size)
    ckpt = {"model_args": asdict(model.config), "model": model.state_dict(), "config": config}
    if vocab is not None:
        ckpt["vocab"] = vocab
    torch.save(ckpt, os.path.join(out_dir, "ckpt.pt"))
    return str(out_dir)


def text_ckpt(tmp_path, data_path, store_vocab=True, block_size=24):
    chars = sorted(set(TEXT))
    config = dict(task="text", data_path=str(data_path), block_size=block_size)
    return write_ckpt(tmp_path / "out", config, len(chars) + 1, block_size, chars if store_vocab else None)


def main_stdout(capsys, *argv):
    sample.main(list(argv))
    return capsys.readouterr().out


# ----------------------------------------------------------------------------- the shipped corpus
@pytest.mark.parametrize("preset", ["shakespeare_char.py", "shakespeare_char_cpu.py"])
def test_shipped_corpus_loads_through_the_preset_path_from_any_directory(preset, tmp_path, monkeypatch):
    source = open(os.path.join(HERE, "config", preset)).read()
    scope = {}
    exec(source, scope)
    assert scope["data_path"] == "data/tinyshakespeare.txt" and "shared" not in source
    assert hashlib.sha256(open(os.path.join(HERE, scope["data_path"]), "rb").read()).hexdigest() == CORPUS_SHA256
    monkeypatch.chdir(tmp_path)  # not the repository: found under the repository
    task = TextTask(scope["data_path"], scope["block_size"])
    assert len(task.chars) == 65 and task.decode(task.encode("ROMEO:")) == "ROMEO:"
    x0, eligible = task.batch(2, "val", torch.Generator().manual_seed(0))
    assert x0.shape == (2, scope["block_size"]) and eligible.all()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tinyshakespeare.txt").write_text(TEXT)  # the current directory comes first
    assert TextTask(scope["data_path"], 16).chars == sorted(set(TEXT))


# ----------------------------------------------------------------------------- stored vocabulary
def test_text_task_with_stored_chars_and_no_data_file_encodes_decodes_and_generates():
    chars = sorted(set(TEXT))
    task = TextTask("", block_size=24, chars=chars)
    assert task.chars == chars and (task.vocab_size, task.mask_id) == (len(chars) + 1, len(chars))
    assert task.decode(task.encode("lazy fox")) == "lazy fox"
    assert task.encode("a").item() == chars.index("a")
    with pytest.raises(ValueError, match="no data file"):
        task.batch(2, "train")
    with pytest.raises(ValueError, match="needs --data_path"):
        TextTask("", block_size=24)
    model = tiny_model(task.vocab_size, 24)
    out = text_sample(model, task, "the", 10, temperature=0.8, generator=torch.Generator().manual_seed(0))
    assert len(out) == 13 and out.startswith("the") and set(out) <= set(chars)


def test_sample_uses_the_stored_vocabulary_when_the_data_file_is_gone(tmp_path, capsys):
    data = tmp_path / "tiny.txt"
    data.write_text(TEXT)
    out = text_ckpt(tmp_path, data)
    assert main_stdout(capsys, f"--out_dir={out}", "--prompt=the", "--length=8", "--num_samples=1")
    data.unlink()
    printed = main_stdout(capsys, f"--out_dir={out}", "--prompt=the", "--length=8", "--num_samples=2")
    assert [ln[:3] for ln in printed.splitlines()[::2]] == ["the", "the"]
    old = text_ckpt(tmp_path, data, store_vocab=False)  # a checkpoint from before "vocab": needs the file
    with pytest.raises(ValueError, match="tiny.txt not found"):
        sample.main([f"--out_dir={old}"])


def test_a_data_file_with_a_different_vocabulary_is_refused(tmp_path):
    data = tmp_path / "tiny.txt"
    data.write_text(TEXT + "QZ!")
    with pytest.raises(ValueError, match=r"3 characters not in the stored vocabulary: '!QZ'"):
        TextTask(str(data), block_size=24, chars=sorted(set(TEXT)))
    out = text_ckpt(tmp_path, data)
    with pytest.raises(ValueError, match=r"does not have the checkpoint's vocabulary.*only in the file: '!QZ'"):
        sample.main([f"--out_dir={out}"])
    data.write_text(TEXT.replace("z", "s"))  # fewer characters than the checkpoint's differ too
    with pytest.raises(ValueError, match=r"only in the file: ''; only in the checkpoint: 'z'"):
        sample.main([f"--out_dir={out}"])


# ----------------------------------------------------------------------------- temperature
def test_text_samples_at_a_temperature_by_default_and_synthetic_tasks_stay_greedy(tmp_path, capsys):
    data = tmp_path / "tiny.txt"
    data.write_text(TEXT)
    out = text_ckpt(tmp_path, data)
    text = lambda *a: main_stdout(capsys, f"--out_dir={out}", "--length=16", "--num_samples=1", *a)
    assert text("--seed=1") != text("--seed=2")
    assert text("--seed=1", "--temperature=0") == text("--seed=2", "--temperature=0.0")
    sort = write_ckpt(tmp_path / "sort", dict(task="sort", num_digits=4, eval_problems=16), 13, 9)
    synthetic = lambda *a: main_stdout(capsys, f"--out_dir={sort}", *a)
    assert synthetic("--prompt=3141=", "--seed=1") == synthetic("--prompt=3141=", "--seed=2")
    accuracy_line = lambda *a: synthetic(*a).splitlines()[-1]
    assert "held-out exact match" in accuracy_line("--seed=1")
    assert accuracy_line("--seed=1") == accuracy_line("--seed=2", "--temperature=1.0")


# ----------------------------------------------------------------------------- synthetic limits
def _split_in_python(digits):
    """The split hash in exact integer arithmetic (no int64), for one problem's digits."""
    code = sum(d * 10 ** i for i, d in enumerate(digits))
    return (((code % 2147483647) * 2654435761) % 4294967291) % 1000 < 100


def test_sort_and_add_are_exact_and_well_split_at_the_largest_num_digits():
    g = torch.Generator().manual_seed(0)
    sort, add = SortTask(18), AddTask(9)
    for task, check in ((sort, lambda p, r: r == "".join(sorted(p[:-1]))),
                        (add, lambda p, r: int(r) == int(p[:9]) + int(p[10:19]) and len(r) == 10)):
        for split in ("train", "val"):
            x0, _ = task.batch(500, split, g)
            for row in x0:
                p, r = task.decode(row[:task.prompt_len]), task.decode(row[task.prompt_len:])
                assert check(p, r), (p, r)
                digits = [int(c) for c in p if c.isdigit()]
                assert _split_in_python(digits) == (split == "val"), p
    # Big sums and carries, not just random ones: 999999999 + 999999999 and friends.
    prompts = torch.stack([add.encode(f"{a:09d}+{b:09d}=") for a, b in
                           [(999999999, 999999999), (999999999, 1), (0, 0), (500000000, 500000000)]])
    assert [int(add.decode(r)) for r in add.response(prompts)] == [1999999998, 1000000000, 0, 1000000000]
    digits = torch.randint(0, 10, (20000, 18), generator=g)
    codes = (digits * 10 ** torch.arange(18)).sum(1)
    assert 0.09 < _in_val(codes).float().mean().item() < 0.11  # the split is not degenerate
    rows = random.Random(0).sample(range(20000), 200)
    assert all(_in_val(codes[i]).item() == _split_in_python(digits[i].tolist()) for i in rows)


def test_num_digits_beyond_int64_or_below_1_is_refused():
    assert 10 ** 18 - 1 <= torch.iinfo(torch.int64).max < 10 ** 19 - 1  # why 18 is the largest
    for name, largest in (("sort", 18), ("add", 9)):
        for bad in (0, -1, largest + 1, 2.0, True):
            with pytest.raises(ValueError, match=f"task={name} takes num_digits from 1 to {largest}"):
                get_task(name, num_digits=bad)
        task = get_task(name, num_digits=1)  # the smallest: both splits non-empty, so batch() ends
        g = torch.Generator().manual_seed(0)
        for split in ("train", "val"):
            x0, _ = task.batch(50, split, g)
            assert task.is_correct(x0[:, :task.prompt_len], x0[:, task.prompt_len:]).all()


@pytest.mark.parametrize("num_digits,bad,expected", [
    (3, "3+14159=", "123+456= (3 digits, '+', 3 digits, '=')"),
    (3, "123+45=6", "123+456= (3 digits, '+', 3 digits, '=')"),
    (3, "123=456+", "123+456= (3 digits, '+', 3 digits, '=')"),
    (3, "12a+456=", "123+456= (3 digits, '+', 3 digits, '=')"),
    (3, "123+456", "123+456= (3 digits, '+', 3 digits, '=')"),
    (None, "3141=926", "12345678= (8 digits, '=')"),
    (None, "3141+926=", "12345678= (8 digits, '=')"),
    (None, "31415926", "12345678= (8 digits, '=')"),
])
def test_a_prompt_with_the_wrong_layout_is_refused_showing_the_layout(num_digits, bad, expected):
    task = AddTask(num_digits) if num_digits else SortTask(8)
    good = "123+456=" if num_digits else "31415926="
    assert task.decode(task.encode(good)) == good
    with pytest.raises(ValueError) as e:
        task.encode(bad)
    assert repr(bad) in str(e.value) and expected in str(e.value)


def test_text_block_size_below_2_is_refused():
    for bad in (1, 0):
        with pytest.raises(ValueError, match="block_size >= 2.*no next-token target"):
            TextTask("", block_size=bad, chars=list("ab"))
    assert TextTask("", block_size=2, chars=list("ab")).block_size == 2


# ----------------------------------------------------------------------------- generation and flags
def test_generate_rejects_a_bad_block_length_steps_temperature_or_remasking():
    task = SortTask(4)
    model = tiny_model(13, 9)
    prompt = task.prompts(2, "val", torch.Generator().manual_seed(0))
    assert not (generate(model, prompt, 4, steps=None, block_length=None) == task.mask_id).any()
    for kw, words in ((dict(block_length=0), "block_length must be > 0"),
                      (dict(block_length=-2), "block_length must be > 0"),
                      (dict(steps=0), "steps must be > 0"), (dict(steps=-1), "steps must be > 0"),
                      (dict(temperature=-0.1), "temperature must be >= 0"),
                      (dict(remasking="greedy"), "unknown remasking")):
        with pytest.raises(ValueError, match=words):
            generate(model, prompt, 4, **kw)


@pytest.mark.parametrize("flag,words", [
    ("--block_length=-1", "--block_length must be >= 0"), ("--steps=-1", "--steps must be >= 0"),
    ("--num_samples=0", "--num_samples must be > 0"), ("--length=0", "--length must be > 0"),
    ("--temperature=-0.5", "--temperature must be a number >= 0"),
    ("--temperature=hot", "--temperature must be a number >= 0"),
    ("--remasking=greedy", "unknown --remasking=greedy"),
])
def test_sample_refuses_a_meaningless_flag_before_any_work(flag, words, tmp_path):
    # out_dir has no checkpoint: the flag must be refused before sample.py looks for one
    with pytest.raises(ValueError, match=words):
        sample.main([f"--out_dir={tmp_path}", flag])


def test_sample_script_turns_a_bad_flag_into_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), f"--out_dir={tmp_path}", "--steps=-1"],
                          capture_output=True, text=True, cwd=HERE, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
    assert "--steps must be >= 0" in lines[0]
