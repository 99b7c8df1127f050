"""nanoGPT-style configuration: `python script.py [config/file.py] --key=value ...`.

Defaults are plain module-level globals (or a dict); a config file is Python that assigns some of
them; `--key=value` overrides one. Values are parsed as Python literals and must keep the
default's type (an int may stand for a float; None defaults accept anything). Bad input exits with
one line naming the key.
"""
import os
import sys
from ast import literal_eval


def fail(msg):
    """One clear error line on stderr and a non-zero exit: the house rule for bad input. Under torchrun
    only rank 0 prints it (every rank exits)."""
    raise SystemExit(f"error: {msg}" if os.environ.get("RANK", "0") == "0" else 1)


def _typed(key, value, default):
    if default is None or isinstance(value, type(default)):
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    fail(f"--{key} expects {type(default).__name__}, got {value!r}")


def configure(config, argv):
    """Apply config files and --key=value overrides from argv to the dict `config`, in place."""
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                fail(f"config file {arg} not found")
            scope = {}
            exec(open(arg).read(), scope)
            for key, value in scope.items():
                if key.startswith("_") or key == "__builtins__":
                    continue
                if key not in config:
                    fail(f"unknown config key {key!r} in {arg}")
                config[key] = _typed(key, value, config[key])
            continue
        key, eq, raw = arg[2:].partition("=")
        if key not in config:
            fail(f"unknown flag --{key}")
        if not eq:
            fail(f"flag --{key} needs a value: --{key}=...")
        try:
            value = literal_eval(raw)
        except (SyntaxError, ValueError):
            value = raw  # a bare string, e.g. --device=cpu
        config[key] = _typed(key, value, config[key])
    return config


def configure_globals(scope, argv=None):
    """nanoGPT's pattern: override the caller's module globals that hold plain config values."""
    keys = [k for k, v in scope.items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))]
    config = configure({k: scope[k] for k in keys}, sys.argv[1:] if argv is None else argv)
    scope.update(config)
    return config
