"""Decode prompts, collect trajectories, chat, demo, score drafters: `python decode.py --help` lists the
commands (`python decode.py COMMAND --help`, each in cllm_jax/cli/; generate.py is the default command)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from cllm_jax.cli.acceptance import acceptance_main
    from cllm_jax.cli.chat import chat_main, demo_main
    from cllm_jax.cli.collect import collect_main, merge_main
    from cllm_jax.cli.common import run_commands
    from cllm_jax.cli.generate import decode_main

    return run_commands(
        sys.argv[1:] if argv is None else argv,
        {"collect": collect_main, "merge": merge_main, "chat": chat_main, "demo": demo_main,
         "acceptance": acceptance_main},
        decode_main,
        error_status=2,
        resume_hint="rerun the same command to resume",
    )


if __name__ == "__main__":
    sys.exit(main())
