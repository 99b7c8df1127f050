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

from tqdm import tqdm


def report_errors():
    """Install the script's error hook: an uncaught ValueError closes any open progress bar, so
    that the message is a line of its own, prints `error: <message>` (under torchrun on rank 0
    only) and the process exits with status 1; other exceptions are untouched."""
    def hook(kind, exc, tb):
        if issubclass(kind, ValueError):
            for bar in list(getattr(tqdm, "_instances", ())):
                bar.close()
            if os.environ.get("RANK", "0") == "0":
                print(f"error: {exc}", file=sys.stderr)
            return
        sys.__excepthook__(kind, exc, tb)
    sys.excepthook = hook


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
