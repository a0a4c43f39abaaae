"""The decoding methods by name: each is a generate function and the options class it takes.

A method is one module holding a frozen keyword-only options class (cllm_jax/decode/options.py)
and a jitted generate function with the signature every method shares:

    generate(model, prompt_tokens, prompt_lengths, row_seeds, cache, key, *, options) -> DecodeOutput

and one line below. The engine, the command line, trajectory collection and the evaluation find
methods, their options, defaults and help here and nowhere else.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from cllm_jax.decode.autoregressive import AROptions, generate_autoregressive
from cllm_jax.decode.jacobi import FixedBlockOptions, generate_jacobi
from cllm_jax.decode.lossless import LosslessOptions
from cllm_jax.decode.options import DecodeOptions
from cllm_jax.decode.placeholder import PlaceholderOptions, generate_placeholder
from cllm_jax.decode.window import MultiblockOptions, RollingOptions, generate_window
from cllm_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    generate: Callable
    options: type[DecodeOptions]
    summary: str
    needs_adapter: bool = False  # the model must carry an adapter (the drafter)

    def make_options(self, **values) -> DecodeOptions:
        """The options from keyword values; a value this method does not take is refused by name."""
        known = {f.name for f in dataclasses.fields(self.options)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{unknown[0]} does not apply to method {self.name} "
                              f"(its options: {', '.join(sorted(known))})")
        return self.options(**values)


METHODS = {m.name: m for m in (
    Method("ar", generate_autoregressive, AROptions, "autoregressive: one token per forward pass"),
    Method("jacobi", generate_jacobi, FixedBlockOptions, "fixed-block Jacobi, the reference algorithm"),
    Method("jacobi-rolling", generate_window, RollingOptions, "rolling Jacobi: accept the settled prefix, slide"),
    Method("jacobi-multiblock", generate_window, MultiblockOptions, "K blocks in flight (Jacobi Forcing's)"),
    Method("jacobi-lossless", generate_window, LosslessOptions, "an adapter drafts, the base model verifies",
           needs_adapter=True),
    Method("lossless-placeholder", generate_placeholder, PlaceholderOptions,
           "a placeholder drafter drafts, the base model verifies, one row per prompt", needs_adapter=True),
)}  # fmt: skip


def get_method(name: str) -> Method:
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"unknown decoding method {name!r} (choose from {', '.join(METHODS)})")
    return METHODS[name]
