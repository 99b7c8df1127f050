"""nanoGPT-style configuration: `python script.py [config/file.py] --key=value ...`, and the one
place where a script turns bad input into one `error:` line.

Defaults are plain module-level globals (or a dict); a config file is Python that assigns some of
them; `--key=value` overrides one. Values are parsed as Python literals and must keep the
default's type (an int may stand for a float, a bool never stands for an int; None defaults accept
anything). Bad input raises ValueError naming the key.

The house rule for errors: library code raises ValueError with a clear message; a script calls
report_errors() once, which turns an uncaught ValueError into one `error: ...` line on stderr and
exit code 1, with no traceback. Any other exception keeps its traceback: that is a bug, not bad
input. Importing a module never ends the interpreter.
"""
import os
import sys
from ast import literal_eval

import torch
from tqdm import tqdm


def report_errors(memory_hint="", interrupted=None):
    """Install the script's error hook. Whatever ends the script, an open progress bar is closed
    first, so that the message is a line of its own (under torchrun, printed on rank 0 only):
      ValueError (bad input)   `error: <message>`, exit status 1;
      out of memory            `error: out of memory (<type>)` + memory_hint (the flags to lower),
                               exit status 1: a MemoryError, torch's OutOfMemoryError, or a
                               RuntimeError from an allocator that could not allocate;
      Ctrl-C                   interrupted() (default: `interrupted`), exit status 130.
    Any other exception keeps its traceback: that is a bug, not bad input. Called again, it
    replaces the hook (a script names what an interruption leaves once it knows)."""
    def hook(kind, exc, tb):
        message, status = None, 1
        if issubclass(kind, ValueError):
            message = f"error: {exc}"
        elif _out_of_memory(exc):
            message = f"error: out of memory ({kind.__name__}){memory_hint and ': ' + memory_hint}"
        elif issubclass(kind, KeyboardInterrupt):
            message, status = interrupted() if interrupted else "interrupted", 130
        if message is None:
            sys.__excepthook__(kind, exc, tb)
            return
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
        if os.environ.get("RANK", "0") == "0":
            print(message, file=sys.stderr)
        if status != 1:  # an uncaught exception exits with 1; 130 is Ctrl-C's convention
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    sys.excepthook = hook


def _out_of_memory(exc):
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(
        s in str(exc) for s in ("can't allocate memory", "out of memory", "Out of memory"))


def _typed(key, value, default):
    if default is None:
        return value
    if isinstance(value, bool) != isinstance(default, bool):
        raise ValueError(f"--{key} expects {type(default).__name__}, got {value!r}")
    if isinstance(value, type(default)):
        return value
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    raise ValueError(f"--{key} expects {type(default).__name__}, got {value!r}")


def _read_config_file(path):
    """The assignments of a Python config file, as a dict; one clear error for a
    missing or broken file."""
    if not os.path.isfile(path):
        raise ValueError(f"config file {path} not found")
    scope = {}
    try:
        exec(compile(open(path).read(), path, "exec"), scope)
    except SyntaxError as e:
        raise ValueError(f"config file {path} line {e.lineno}: {e.msg}") from None
    except Exception as e:  # a config file is Python: any error in it is the user's input
        raise ValueError(f"config file {path} failed: {type(e).__name__}: {e}") from None
    return {k: v for k, v in scope.items() if not k.startswith("_")}


def configure(config, argv):
    """Apply config files and --key=value overrides from argv to the dict `config`, in place."""
    for arg in argv:
        if not arg.startswith("--"):
            for key, value in _read_config_file(arg).items():
                if key not in config:
                    raise ValueError(f"unknown config key {key!r} in {arg}")
                config[key] = _typed(key, value, config[key])
            continue
        key, eq, raw = arg[2:].partition("=")
        if key not in config:
            raise ValueError(f"unknown flag --{key}")
        if not eq:
            raise ValueError(f"flag --{key} needs a value: --{key}=...")
        try:
            value = literal_eval(raw)
        except (SyntaxError, ValueError):
            value = raw  # a bare string, e.g. --device=cpu
        config[key] = _typed(key, value, config[key])
    return config


def check_ranges(config, ranges):
    """ValueError naming the first key outside its closed range: ranges maps key -> (lo, hi), with
    None for an unbounded side."""
    for key, (lo, hi) in ranges.items():
        value = config[key]
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bound = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
            raise ValueError(f"--{key}={value!r} is out of range: it must be {bound}")


def given_keys(argv):
    """The keys that argv sets (config files and --key=value flags), e.g. to tell on resume which
    values the user asked for and which come from the checkpoint."""
    keys = set()
    for arg in argv:
        keys |= {arg[2:].partition("=")[0]} if arg.startswith("--") else set(_read_config_file(arg))
    return keys


def configure_globals(scope, argv=None):
    """nanoGPT's pattern: override the caller's module globals that hold plain config values."""
    keys = [k for k, v in scope.items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))]
    config = configure({k: scope[k] for k in keys}, sys.argv[1:] if argv is None else argv)
    scope.update(config)
    return config
