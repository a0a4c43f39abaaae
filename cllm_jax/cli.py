"""The one way decode.py and train.py turn a subcommand table into an exit status.

Errors the user can fix (`CllmError`) become one line on stderr, never a traceback; Ctrl-C says how
to resume, since every long job here (collection, training, the pipeline) picks up where it stopped.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from cllm_jax.errors import CllmError


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
        if argv[:1] and argv[0] in commands:
            commands[argv[0]](argv[1:])
        else:
            default(argv)
    except CllmError as error:
        print(f"error: {error}", file=sys.stderr)
        return error_status
    except KeyboardInterrupt:
        print(f"interrupted: {resume_hint}", file=sys.stderr)
        return 130
    return 0
