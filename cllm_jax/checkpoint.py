"""Training checkpoints through orbax's CheckpointManager, and the exported model of a run.

A checkpoint step directory holds two items: `state` (the TrainState pytree: parameters, optimizer
state, step, RNG; written by every process, each its own shards) and `data` (a small JSON record
of the data position: epoch, cursor, and what identifies the data set). Saves are asynchronous:
`save` returns once the arrays are copied off the devices, and the files are written in the
background; an interrupted save leaves a temporary directory that is never restored from.

Restoring takes an abstract TrainState whose leaves carry the target shardings, so a checkpoint
written on one mesh restores onto any other (orbax reads the slices each device needs).
"""

from __future__ import annotations

import os
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
        return bool(self.manager.save(step, args=args, force=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def restore(self, abstract_state, step: int | None = None):
        """(state, data position) of `step` (default: the latest), placed as `abstract_state` says."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        try:
            restored = self.manager.restore(step, args=args)
        except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
            raise CheckpointError(f"cannot restore step {step} from {self.directory} ({e}); was it written "
                                  f"by a run with another model or optimizer?") from None
        return restored["state"], dict(restored["data"])

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def latest_export(run_dir: str | os.PathLike) -> Path:
    """The Hugging Face directory a finished training run exported (RUN_DIR/export)."""
    path = Path(run_dir) / EXPORT_DIR
    if not (path / "config.json").is_file():
        hint = ("its checkpoints are there but no export: rerun train.py with the same config to finish "
                "and export" if (Path(run_dir) / CHECKPOINT_DIR).is_dir() else "is it a training run directory?")
        raise CheckpointError(f"{run_dir} holds no exported model ({path}/config.json missing): {hint}")
    return path
