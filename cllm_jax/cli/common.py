"""The one way decode.py and train.py turn a subcommand table into an exit status.

Errors the user can fix (`CllmError`) become one line on stderr, never a traceback, and so do the
storage errors of the operating system (a full disk, a read-only or forbidden directory), with the
file they hit. `CllmWarning`s are one line too. Ctrl-C says how to resume, since every long job here
(collection, training, the pipeline) picks up where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import sys
import warnings
from collections.abc import Callable, Sequence

from cllm_jax.errors import CllmError, CllmWarning

_STORAGE_FIXES = {
    errno.ENOSPC: "free disk space",
    errno.EDQUOT: "free disk space (or raise the quota)",
    errno.EFBIG: "free disk space (or raise the file size limit)",
    errno.EROFS: "write to a writable file system",
    errno.EACCES: "make it writable (or choose another directory)",
    errno.EPERM: "make it writable (or choose another directory)",
}


def _drop_orbax_tracebacks(record: logging.LogRecord) -> bool:
    # orbax logs a failed background save with its whole traceback (hundreds of lines) before the
    # Checkpointer re-raises it as a one-line CheckpointError: the line is what the user needs.
    # (The record's pathname is absl's own file, so the traceback tells where it came from.)
    tb = record.exc_info[2] if record.exc_info else None
    while tb is not None:
        if "orbax" in tb.tb_frame.f_code.co_filename:
            return False
        tb = tb.tb_next
    return True


# What a future's exception says when it belongs to a failed save (orbax's temporary directory) or to
# the restore of a damaged checkpoint (tensorstore reading its OCDBT files).
_ABANDONED_CHECKPOINT_IO = (".orbax-checkpoint-tmp", "in OCDBT database at")


def _drop_abandoned_checkpoint_writes(record: logging.LogRecord) -> bool:
    # The other writes of a failed save, and the other reads of a damaged checkpoint's restore, end as
    # futures and tasks nobody awaits; asyncio logs each one ("... exception was never retrieved") when
    # it is collected, which may be after the command returned. The save's error, or the warning that
    # set the damaged checkpoint aside, is already the one line reported. A task's traceback runs
    # through orbax; a future's exception has none, so it is known by its text.
    error = record.exc_info[1] if record.exc_info else None
    return _drop_orbax_tracebacks(record) and not (
        error is not None and any(mark in str(error) for mark in _ABANDONED_CHECKPOINT_IO))


def _drop_closed_loop_callbacks() -> None:
    """Wrap sys.unraisablehook (once) to ignore what a failed checkpoint save or restore leaves behind.

    After a failed save or restore, orbax closes its event loop while tensorstore still completes
    the other writes/reads; each late callback reports "Event loop is closed" as an unraisable
    exception, and each read that failed with the damaged file reports its exception again from a
    coroutine nobody awaits, one traceback each (dozens), racing with the exit. The failure itself
    is already the one line reported. The hook stays: they may come after the command has returned.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_callbacks", False):
        return

    def from_orbax(error) -> bool:
        tb = error.__traceback__ if error is not None else None
        while tb is not None:
            if "orbax" in tb.tb_frame.f_code.co_filename:
                return True
            tb = tb.tb_next
        return False

    def hook(unraisable):
        error = unraisable.exc_value
        closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        if not (closed_loop or from_orbax(error)):
            previous(unraisable)

    hook.drops_closed_loop_callbacks = True
    sys.unraisablehook = hook


@contextlib.contextmanager
def _one_line_reports():
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CllmWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    original, absl = warnings.showwarning, logging.getLogger("absl")
    warnings.showwarning = show
    _drop_closed_loop_callbacks()
    absl.addFilter(_drop_orbax_tracebacks)
    # stays after the command (addFilter ignores a second add): the records may come at exit
    logging.getLogger("asyncio").addFilter(_drop_abandoned_checkpoint_writes)
    # ... and the writes of a failed save never started warn at interpreter exit that they were never awaited
    warnings.filterwarnings("ignore", r"coroutine 'async_serialize_from_host\.", RuntimeWarning)
    try:
        yield
    finally:
        warnings.showwarning = original
        absl.removeFilter(_drop_orbax_tracebacks)


def run_commands(
    argv: Sequence[str],
    commands: dict[str, Callable[[list[str]], None]],
    default: Callable[[list[str]], None],
    *,
    error_status: int,
    resume_hint: str,
) -> int:
    """Dispatch argv[0] to `commands` (else everything to `default`) and return the exit status."""
    argv = list(argv)
    try:
        with _one_line_reports():
            if argv[:1] and argv[0] in commands:
                commands[argv[0]](argv[1:])
            else:
                default(argv)
    except CllmError as error:
        print(f"error: {error}", file=sys.stderr)
        return error_status
    except OSError as error:
        if error.errno not in _STORAGE_FIXES:
            raise
        where = f": {error.filename}" if error.filename else ""
        print(f"error: {error.strerror}{where}: {_STORAGE_FIXES[error.errno]}, then {resume_hint}",
              file=sys.stderr)
        return error_status
    except KeyboardInterrupt:
        print(f"interrupted: {resume_hint}", file=sys.stderr)
        return 130
    except Exception as error:  # XLA's allocation failure: its message is a page, the fix one line
        if type(error).__name__ != "JaxRuntimeError" or "RESOURCE_EXHAUSTED" not in str(error):
            raise
        wanted = str(error).split("RESOURCE_EXHAUSTED:", 1)[1].strip().splitlines()[0]
        print(f"error: out of memory ({wanted}): lower --batch-size or --max-new-tokens, or shorten the longest "
              f"prompts; {resume_hint}", file=sys.stderr)
        return error_status
    return 0


# ------------------------------------------------------------------------ flags from options classes

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_option_flags(parser, classes, skip: Sequence[str] = ()) -> dict[str, object]:
    """One flag per field of the given options dataclasses (cllm_jax/decode/options.py's `option`):
    type, choices and help come from the field, its default is shown in the help, and the parsed
    default is None, so that only the flags given on the command line reach the options (the field's
    own default applies otherwise). Returns the fields by name."""
    import dataclasses

    fields = {}
    for cls in classes:
        for field in dataclasses.fields(cls):
            if field.name in skip or field.name in fields or "help" not in field.metadata:
                continue
            fields[field.name] = field
            kind = {"int": int, "float": float, "str": str, "bool": bool}.get(str(field.type).split(" |")[0], str)
            meta = field.metadata
            text = f"{meta['help']} (default {field.default})"
            if kind is bool:
                parser.add_argument(_flag(field.name), dest=field.name, default=None, help=text,
                                    action=argparse.BooleanOptionalAction)
            else:
                parser.add_argument(_flag(field.name), dest=field.name, default=None, type=kind, help=text,
                                    choices=meta.get("choices"))
    return fields


def given_flags(args, fields: dict[str, object]) -> dict[str, object]:
    """The option values given on the command line (None: not given)."""
    return {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}


def flag_error(error: CllmError) -> CllmError:
    """An options refusal in terms of the command line: `block_size must ...` -> `--block-size must ...`."""
    from cllm_jax.decode.options import OptionError
    from cllm_jax.errors import ConfigError

    if isinstance(error, OptionError):
        return ConfigError(f"{_flag(error.name)} {error.problem}")
    return error


def collect_progress():
    """An on_batch callback for trajectory collection that draws its progress bar (prompts, rate, ETA,
    tokens/s). The bar appears with the first finished batch (so none stands before an early error)
    but counts time from when the callback was made, so its first rate is a real one. `.close()` ends
    its line, so that an error after it stands on a line of its own."""
    import time

    from tqdm import tqdm

    started, state = time.time(), {"bar": None, "tokens": 0}

    def on_batch(results, left):
        bar = state["bar"]
        if bar is None:
            bar = state["bar"] = tqdm(desc="collect", unit="prompt", file=sys.stderr)
            bar.start_t = started  # tqdm's clock is time.time
        state["tokens"] += sum(len(r.token_ids) for r in results)
        bar.total = bar.n + len(results) + left
        bar.update(len(results))
        bar.set_postfix(tok_s=f"{state['tokens'] / max(bar.format_dict['elapsed'], 1e-9):.1f}")

    on_batch.close = lambda: state["bar"] is not None and state["bar"].close()
    return on_batch
