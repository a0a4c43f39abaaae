"""Training checkpoints through orbax's CheckpointManager, and the exported model of a run.

A checkpoint step directory holds two items: `state` (the TrainState pytree: parameters, optimizer
state, step, RNG; written by every process, each its own shards) and `data` (a small JSON record
of the data position: epoch, cursor, and what identifies the data set). Saves are asynchronous:
`save` returns once the arrays are copied off the devices, and the files are written in the
background; an interrupted save leaves a temporary directory that is never restored from.

Restoring takes an abstract TrainState whose leaves carry the target shardings, so a checkpoint
written on one mesh restores onto any other (orbax reads the slices each device needs).

Failures are one-line `CheckpointError`s: a save that cannot be written (a full disk, a read-only
directory; orbax and tensorstore report these as long tracebacks or ValueErrors carrying the OS
error code) names the step, the cause and the way to resume; a step that cannot be read back
(a data file or `_METADATA` missing) is set aside by `restore_newest`, which falls back to the one
before it.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from cllm_jax.errors import CheckpointError

EXPORT_DIR = "export"
CHECKPOINT_DIR = "checkpoints"


def _remove_interrupted_saves(directory: Path) -> None:
    """Delete the temporary directories of saves that a killed run left behind.

    Not orbax's `cleanup_tmp_directories`: it deletes in a background thread per manager, so two
    managers opened on one directory (a look at `all_steps`, then the resumed run) race to delete
    the same path and the loser fails its first save with FileNotFoundError.
    """
    if jax.process_index() != 0 or not directory.is_dir():
        return
    for path in directory.glob("*.orbax-checkpoint-tmp*"):
        shutil.rmtree(path, ignore_errors=True)


DAMAGED_SUFFIX = ".damaged"


def _cause(error: Exception) -> str:
    """The short cause of an orbax/tensorstore failure: the OS error when there is one."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    code = re.search(r"os_error_code='(\d+)'", str(error))  # tensorstore's form of an OS error
    if code:
        return os.strerror(int(code.group(1)))
    if "reading array index" in str(error):  # orbax's wrapper around a tensorstore read of a bad file
        return "a data file cannot be read: missing, truncated or corrupt"
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__


class Checkpointer:
    """Save every `every` steps (and whenever forced), keep the newest `keep`."""

    def __init__(self, directory: str | os.PathLike, every: int = 200, keep: int = 2, asynchronous: bool = True):
        self.directory = Path(directory).absolute()
        self.every = every
        _remove_interrupted_saves(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=asynchronous,
            create=True,
            cleanup_tmp_directories=False,  # done above, synchronously
        )
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot open the checkpoint directory {self.directory}: {e}") from None

    def should_save(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, state, data_position: dict, force: bool = False) -> bool:
        """Start saving `state` at `step` if it is due (or forced); returns whether it saves."""
        if not (force or self.should_save(step)) or step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position))
        try:  # an asynchronous save's failure surfaces here at the next save, or in `wait`
            return bool(self.manager.save(step, args=args, force=True))
        except Exception as e:
            raise self._write_error(e) from None

    def _write_error(self, error: Exception) -> CheckpointError:
        kept = self.manager.latest_step()
        resume = f"resume from step {kept}" if kept else "start again"
        return CheckpointError(f"cannot write a checkpoint in {self.directory} ({_cause(error)}): free disk space "
                               f"or make it writable, then rerun the same command to {resume}")

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def restore(self, abstract_state, step: int | None = None):
        """(state, data position) of `step` (default: the latest), placed as `abstract_state` says."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        try:
            return self._restore(abstract_state, step)
        except Exception as e:
            raise self._read_error(step, e) from None

    def _restore(self, abstract_state, step: int):
        # without its _METADATA orbax misreads the tree ("pytree structure error"), hiding the cause
        if not (self.directory / str(step) / "state" / "_METADATA").is_file():
            raise FileNotFoundError(errno.ENOENT, "state/_METADATA is missing")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored["state"], dict(restored["data"])

    def _read_error(self, step: int, error: Exception) -> CheckpointError:
        # a lost file raises FileNotFoundError or tensorstore's NOT_FOUND ValueError; another model's
        # or optimizer's tree raises Key/Type/ValueErrors about structure and shapes
        text = str(error)
        if isinstance(error, FileNotFoundError) or "NOT_FOUND" in text or "does not exist" in text:
            return CheckpointError(f"checkpoint step {step} in {self.directory} is damaged ({_cause(error)}) and "
                                   f"none before it restores: move {self.directory / str(step)} aside and rerun "
                                   f"to start again")
        return CheckpointError(f"cannot restore step {step} from {self.directory} ({_cause(error)}); was it "
                               f"written by a run with another model or optimizer?")

    def restore_newest(self, abstract_state) -> tuple[int, object, dict, list[str]]:
        """(step, state, data position, notes) of the newest checkpoint that restores.

        A newer step that fails to restore while an older one succeeds is damaged (a file lost):
        it is renamed `N.damaged` (kept, never restored from or counted again) and described in
        `notes`. When none restores, the newest one's error is raised: then it is the settings
        (another model or optimizer) that differ, not one damaged step.
        """
        errors = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, position = self._restore(abstract_state, step)
            except Exception as e:  # noqa: BLE001 - whatever it is, the step does not restore
                errors.append((step, e))
                continue
            notes = [self._set_aside(bad, error) + f"; resumed from step {step}" for bad, error in errors]
            self.manager.reload()
            return step, state, position, notes
        if not errors:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        raise self._read_error(*errors[0])

    def _set_aside(self, step: int, error: Exception) -> str:
        path, aside = self.directory / str(step), self.directory / f"{step}{DAMAGED_SUFFIX}"
        for n in range(2, 1000):  # a step damaged before keeps its own copy
            if not aside.exists():
                break
            aside = self.directory / f"{step}{DAMAGED_SUFFIX}{n}"
        try:
            if jax.process_index() == 0:
                os.replace(path, aside)
        except OSError as e:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged ({_cause(error)}) and "
                                  f"cannot be set aside ({e.strerror}): move {path} away, then rerun") from None
        return f"checkpoint step {step} is damaged ({_cause(error)}), set aside as {aside}"

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._write_error(e) from None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def latest_export(run_dir: str | os.PathLike) -> Path:
    """The Hugging Face directory a finished training run exported (RUN_DIR/export)."""
    path = Path(run_dir) / EXPORT_DIR
    if not (path / "config.json").is_file():
        hint = ("its checkpoints are there but no export: rerun train.py with the same config to finish "
                "and export" if (Path(run_dir) / CHECKPOINT_DIR).is_dir() else "is it a training run directory?")
        raise CheckpointError(f"{run_dir} holds no exported model ({path}/config.json missing): {hint}")
    return path
