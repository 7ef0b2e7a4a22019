"""
What every script here shares on its command line and in what it writes.

    settings   config files (plain Python assignments) and --key=value overrides, checked against the
               dataclass fields they set: their types, their LIMITS and the config's own __post_init__
    --help     the script's docstring, then every setting with its default, limit and source comment
    errors     one `error: ...` line and exit status 2, never a traceback, for every bad input
    results    the provenance header every results file opens with: command, commit, machine, torch

train.py, measure.py, lab.py and bench.py all parse their settings here, so a setting is checked the
same way everywhere and a typo gets the same "did you mean" line.
"""
import ast
import dataclasses
import difflib
import inspect
import io
import operator
import os
import platform
import secrets
import shlex
import subprocess
import sys
import textwrap
import time
import tokenize
import typing

class ConfigError(ValueError):
    pass


def parse_value(key, value, annotation, text=None):
    """Check (and where safe, convert) a setting against the type its dataclass field declares.
    `text` is the raw command-line text, when the value came from `--key=text`."""
    allowed = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if value is None and type(None) in typing.get_args(annotation):
        return None
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is str and (isinstance(value, str) or text is not None):
            return value if isinstance(value, str) else text
    names = " or ".join(k.__name__ for k in allowed)
    raise ConfigError(f"{key}={text if text is not None else value!r}: expected {names}")


def read_config_file(path):
    """A config file's settings: its plain Python assignments, as {name: value}."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found (settings are --key=value)")
    namespace = {}
    exec(open(path).read(), namespace)
    return {key: value for key, value in namespace.items()
            if not key.startswith("_") and not callable(value) and not isinstance(value, type(os))}


def parse_overrides(argv, *config_types, others_in_files=False, doc=None):
    """Config files and `--key=value` overrides -> one dict of settings per dataclass type.

    A key belongs to the first dataclass that has a field of that name. Unknown keys, values of the
    wrong type or outside the dataclass's LIMITS, and settings its own __post_init__ rejects raise
    ConfigError with a one-line message that names the key: every script that parses its settings
    here gets these checks before it touches any data. With others_in_files, a config file's key that
    none of config_types has is skipped (bench.py reads train.py's presets for their model and batch).
    Given the script's docstring, `--help` prints it with every setting (help_text) and exits."""
    if doc is not None and any(arg in ("-h", "--help") for arg in argv):
        print(help_text(doc, *config_types))
        sys.exit(0)
    hints = [typing.get_type_hints(t) for t in config_types]
    known = [k for h in hints for k in h]
    settings = [{} for _ in config_types]

    def assign(key, value, text=None):
        for config_type, hint, chosen in zip(config_types, hints, settings):
            if key in hint:
                chosen[key] = parse_value(key, value, hint[key], text)
                check_limit(key, chosen[key], getattr(config_type, "LIMITS", {}).get(key))
                return
        close = difflib.get_close_matches(key, known, n=1)
        raise ConfigError(f"unknown setting '{key}'" + (f"; did you mean '{close[0]}'?" if close else ""))

    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:  # a bare --flag means True for a bool setting
                text = "True"
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare word: a string setting such as --arch=ledger
            assign(key, value, text)
        else:
            for key, value in read_config_file(arg).items():
                if key in known or not others_in_files:
                    assign(key, value)
    for config_type, chosen in zip(config_types, settings):
        try:  # the config's own checks across settings (heads that divide the width, ...), now too
            config_type(**chosen)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return settings


LIMIT_TESTS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def check_limit(key, value, limit):
    """Raise ConfigError unless `value` meets `limit`: a tuple of the allowed values, or a rule such
    as '>= 1' or '>= 0 and < 1' (a config's LIMITS; --help shows the same text). None passes."""
    if limit is None or value is None:
        return
    if isinstance(limit, tuple):
        if value not in limit:
            raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(str, limit))}")
    elif not all(LIMIT_TESTS[op](value, float(bound)) for op, bound in map(str.split, limit.split(" and "))):
        raise ConfigError(f"{key}={value!r}: must be {limit}")


def documented_fields(config_type):
    """The fields of a config dataclass in source order, as (name, comment): the comment after each
    field, with the comment-only lines indented below it. A comment line of its own at the fields'
    indent (`# data`) comes as (None, heading). --help is made of these, so it cannot drift."""
    source = textwrap.dedent(inspect.getsource(config_type))
    lines = source.splitlines()
    comments = {t.start[0]: (t.start[1], t.string.lstrip("#").strip())
                for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    fields = {node.lineno: (node.col_offset, node.target.id)
              for node in ast.parse(source).body[0].body if isinstance(node, ast.AnnAssign)}
    indent, last_field = min(col for col, _ in fields.values()), max(fields)
    rows, previous = [], None   # previous: the line the last field or its comment ended on
    for number in sorted(set(fields) | set(comments)):
        column, text = comments.get(number, (None, ""))
        if number in fields:
            rows.append((fields[number][1], text))
            previous = number
        elif lines[number - 1].lstrip().startswith("#"):
            if column > indent and previous == number - 1:
                rows[-1] = (rows[-1][0], f"{rows[-1][1]} {text}")
                previous = number
            elif column == indent and number < last_field:
                rows.append((None, text))
    return rows


def help_text(doc, *config_types):
    """--help: the script's docstring, then every setting of each config with its type, default,
    limit and the comment the source gives it."""
    def shown(value):
        return '""' if value == "" else str(value)

    out = [doc.strip(), "", "Settings, as --key=value (type, limit: meaning):"]
    for config_type in config_types:
        hints = typing.get_type_hints(config_type)
        defaults = {f.name: f.default for f in dataclasses.fields(config_type)}
        limits = getattr(config_type, "LIMITS", {})
        out += ["", f"{config_type.__name__} ({os.path.basename(inspect.getsourcefile(config_type))}):"]
        for name, comment in documented_fields(config_type):
            if name is None:
                out.append(f"  # {comment}")
                continue
            kinds = typing.get_args(hints[name]) or (hints[name],)
            kind = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
            limit = limits.get(name)
            if limit is not None:
                kind += f", {'|'.join(limit)}" if isinstance(limit, tuple) else f", {limit}"
            out.append(f"  {f'--{name}={shown(defaults[name])}':<32}  {kind}: {comment}")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# Errors, durations and provenance

def run_main(main):
    """Run a script's main() and return what it returns; a bad input (ConfigError, and DataError
    with it) becomes one `error: ...` line on stderr and exit status 2, never a traceback."""
    try:
        return main()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def atomic_write(path, write):
    """A file written whole or not at all: write(f) fills a temp file beside `path` (.tmp-*, which prepare_data.py
    sweeps away), flushed to disk and renamed over it, the folder flushed too: a crash leaves the old file."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".tmp-{name}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder_fd = os.open(folder, os.O_RDONLY)
        os.fsync(folder_fd)
        os.close(folder_fd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def duration(seconds):
    """A wall time at a glance: 7 -> '7s', 125 -> '2m05s', 3725 -> '1h02m', 200000 -> '2d07h'."""
    s = int(round(seconds))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def provenance():
    """Where a result comes from: the commit, the CPU (or GPU), the threads, torch and the date.
    Floating-point sums run in another order on another CPU or thread count, and over thousands of
    steps that moves a lab's numbers as much as a seed does, so every results file names these."""
    import torch   # here, so that a script's --help and its bad flags stay fast

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository

    def git(*args):
        try:
            done = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
            return done.stdout.strip() if done.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    # only code changes what a command computes: an edited README does not flag a result
    commit = git("rev-parse", "--short=10", "HEAD")
    changes = git("status", "--porcelain", "--untracked-files=no", "--", "*.py", "config")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"commit": (commit + (" with uncommitted code changes" if changes else "")) if commit else "unknown (no git)",
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"{cpu}, {os.cpu_count()} cores",
            "threads": torch.get_num_threads(), "torch": str(torch.__version__),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def results_header(script, argv, trained=None):
    """The provenance header of a results file (summary.md, bench.md, ...): the command that wrote
    it and where it ran, and for measured runs where each was trained. docs/results/ holds copies of
    such files, so a number in the docs always names its command, machine and code."""
    p = provenance()
    lines = [f"> Written by `python {shlex.join([*script.split(), *argv])}` on {p['date']}, at commit {p['commit']},",
             f"> on {p['device']}, torch threads {p['threads']}, torch {p['torch']}."]
    for run, starts in (trained or {}).items():
        where = "; then ".join(f"trained at commit {s['commit']} on {s['device']}, torch threads {s['threads']}, "
                               f"from step {s['from_iter']} on {s['date']}" for s in starts)
        lines.append(f"> {run}: {where or 'no training record (trained before checkpoints kept one)'}.")
    return "\n".join(lines) + "\n"
