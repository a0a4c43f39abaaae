"""The decoding methods by name: each is a generate function and the options class it takes.

A method is one module holding a frozen keyword-only options class (cllm_jax/decode/options.py)
and a jitted generate function with the signature every method shares:

    generate(model, prompt_tokens, prompt_lengths, row_seeds, cache, key, *, options) -> DecodeOutput

and one line below. The engine, the command line, trajectory collection and the evaluation find
methods, their options, defaults and help here and nowhere else; and what the others need to know of
a method besides: whether the base model verifies its every token (the evaluation then holds its text
to the base model's AR text, the report lists it as lossless) and what an adapter on the model means
for it, read by `resolve_method` for the command line, the chat and the evaluation alike.
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


# What an adapter the model carries means for a method (unless it is merged into the weights, which
# every method but a drafting one runs as the lossy CLLM):
#   drafts  the method drafts with it and the base model verifies; it needs one and cannot merge it
#   base    the method runs the base model alone (AR: the text lossless decoding gives), the adapter aside
#   merged  the method only runs the adapter merged; see `with_adapter` for what runs instead
ADAPTER_ROLES = ("drafts", "base", "merged")


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    generate: Callable
    options: type[DecodeOptions]
    summary: str
    verifies_with_base: bool = False  # the base model verifies every token: the text is the base model's own
    adapter_role: str = "merged"  # ADAPTER_ROLES
    with_adapter: str | None = None  # the method that runs in this one's place on an adapter left unmerged

    def __post_init__(self):
        if self.adapter_role not in ADAPTER_ROLES:
            raise ValueError(f"method {self.name}: adapter_role {self.adapter_role!r} is not one of {ADAPTER_ROLES}")

    @property
    def needs_adapter(self) -> bool:
        return self.adapter_role == "drafts"

    def make_options(self, **values) -> DecodeOptions:
        """The options from keyword values; a value this method does not take is refused by name."""
        known = {f.name for f in dataclasses.fields(self.options)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{unknown[0]} does not apply to method {self.name} "
                              f"(its options: {', '.join(sorted(known))})")
        return self.options(**values)


METHODS = {m.name: m for m in (
    Method("ar", generate_autoregressive, AROptions, "autoregressive: one token per forward pass",
           adapter_role="base"),
    Method("jacobi", generate_jacobi, FixedBlockOptions, "fixed-block Jacobi, the reference algorithm"),
    Method("jacobi-rolling", generate_window, RollingOptions, "rolling Jacobi: accept the settled prefix, slide",
           with_adapter="jacobi-lossless"),
    Method("jacobi-multiblock", generate_window, MultiblockOptions, "K blocks in flight (Jacobi Forcing's)",
           with_adapter="jacobi-lossless"),
    Method("jacobi-lossless", generate_window, LosslessOptions, "an adapter drafts, the base model verifies",
           verifies_with_base=True, adapter_role="drafts"),
    Method("lossless-placeholder", generate_placeholder, PlaceholderOptions,
           "a placeholder drafter drafts, the base model verifies, one row per prompt", verifies_with_base=True,
           adapter_role="drafts"),
)}  # fmt: skip


PLACEHOLDER_METHOD = "lossless-placeholder"  # the method a placeholder drafter drafts with


def get_method(name: str) -> Method:
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"unknown decoding method {name!r} (choose from {', '.join(METHODS)})")
    return METHODS[name]


@dataclasses.dataclass(frozen=True)
class Resolved:
    """The method that runs and what becomes of the model's adapter: none (the model has none), drafts,
    merged (folded into the weights: the lossy CLLM), or set_aside (the base model alone)."""

    method: Method
    adapter: str


def resolve_method(name: str, model_has_adapter: bool, merge_adapter: bool,
                   placeholder_drafter: bool = False) -> Resolved:
    """The one reading of a method name on a model that may carry an adapter, for the command line, the
    chat and the evaluation alike. `merge_adapter`: the adapter is to be folded into the weights;
    `placeholder_drafter`: the adapter is a placeholder drafter, which drafts only with
    lossless-placeholder (and cannot be merged: it acts on placeholder tokens alone)."""
    method = get_method(name)
    if model_has_adapter and placeholder_drafter:
        if method.needs_adapter and name != PLACEHOLDER_METHOD or merge_adapter:
            raise ConfigError(f"the adapter is a placeholder drafter: it drafts with --method {PLACEHOLDER_METHOD} "
                              f"(neither {name} nor a merge can use it)")
        if method.with_adapter is not None:
            return Resolved(get_method(PLACEHOLDER_METHOD), "drafts")
    elif model_has_adapter and name == PLACEHOLDER_METHOD:
        raise ConfigError(f"{PLACEHOLDER_METHOD} drafts with a placeholder drafter, and this adapter has no "
                          f"placeholders: use --method jacobi-lossless (or --draft-adapter smollm2-gsm8k)")
    if not model_has_adapter:
        if merge_adapter:
            raise ConfigError("merging an adapter needs one: load a model that carries an adapter")
        if method.needs_adapter:
            raise ConfigError(f"method {name} drafts with an adapter but the model has none: load one "
                              f"(decode.py --draft-adapter DIR) or train one (train.adapter)")
        return Resolved(method, "none")
    if merge_adapter:
        if method.needs_adapter:
            raise ConfigError(f"method {name} drafts with the adapter, which merging would fold into the weights: "
                              f"keep the adapter apart (lossless), or merge it under a method that does not draft "
                              f"(the lossy CLLM)")
        return Resolved(method, "merged")
    if method.with_adapter is not None:
        return Resolved(get_method(method.with_adapter), "drafts")
    if method.adapter_role == "merged":
        drafting = ", ".join(m.name for m in METHODS.values() if m.needs_adapter or m.with_adapter)
        raise ConfigError(f"method {name} cannot draft with an adapter: choose one of {drafting}, or merge the "
                          f"adapter into the weights (the lossy CLLM)")
    return Resolved(method, "drafts" if method.needs_adapter else "set_aside")
