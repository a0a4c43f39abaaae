"""Decoding options: frozen, keyword-only dataclasses whose fields declare their own range and help.

Each decoding method takes one options class (cllm_jax/decode/registry.py). A field is declared once,
with `option(...)`: its default, a one-line help, and what values it takes. `__post_init__` checks
every field against that declaration, so a bad value is refused where it is declared, whoever
builds the options (the command line, a pipeline config, a test); the command line derives its
flags, defaults and help from the same fields (decode.py) and turns the refusal into one line.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from cllm_jax.errors import ConfigError


class OptionError(ConfigError):
    """A decoding option out of its declared range; `name` is the field, `problem` the rest."""

    def __init__(self, name: str, problem: str):
        self.name, self.problem = name, problem
        super().__init__(f"{name} {problem}")


def option(default: Any, help: str, *, choices: tuple | None = None, at_least: float | None = None,
           at_most: float | None = None, above: float | None = None, below: float | None = None) -> Any:
    """A dataclass field carrying its help and valid range (checked by Options.__post_init__)."""
    meta = {"help": help, "choices": choices, "at_least": at_least, "at_most": at_most, "above": above,
            "below": below}
    return dataclasses.field(default=default, metadata=meta)


def option_like(cls: type, name: str, default: Any = dataclasses.MISSING, help: str | None = None) -> Any:
    """Another class's declared option, for a class that takes the same value with its own default (the
    collection's block size is the decoder's block size): its range and help are declared only there."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    meta = dict(field.metadata)
    if help is not None:
        meta["help"] = help
    return dataclasses.field(default=field.default if default is dataclasses.MISSING else default, metadata=meta)


def check_value(name: str, value: Any, meta: dict) -> None:
    if not meta:
        return
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise OptionError(name, f"must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    bounds = [meta.get(k) for k in ("at_least", "at_most", "above", "below")]
    if value is None or all(b is None for b in bounds):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OptionError(name, f"must be a finite number, got {value!r}")
    low, high, above, below = bounds
    if low is not None and value < low:
        raise OptionError(name, f"must be at least {_number(low)}, got {_number(value)}")
    if high is not None and value > high:
        raise OptionError(name, f"must be at most {_number(high)}, got {_number(value)}")
    if above is not None and value <= above:
        raise OptionError(name, f"must be above {_number(above)}, got {_number(value)}")
    if below is not None and value >= below:
        raise OptionError(name, f"must be below {_number(below)}, got {_number(value)}")


def _number(value: float) -> str:
    # whole numbers whole: a 64-bit bound in exponent notation would hide what the limit is
    return str(value) if isinstance(value, int) else f"{value:g}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    """Base of every options class: checks each field against its declaration."""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            check_value(field.name, getattr(self, field.name), dict(field.metadata))

    def replace(self, **changes) -> "Options":
        return dataclasses.replace(self, **changes)


# JAX keys a seed as a signed 64-bit integer
SEED_MAX = 2**63 - 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampling(Options):
    """temperature 0 means greedy; top_k 0 and top_p 1.0 switch those filters off (sampling.py)."""

    temperature: float = option(0.0, "0 = greedy; above 0, seeded sampling at this temperature", at_least=0.0)
    top_k: int = option(0, "sample among the k most likely tokens (0: all)", at_least=0)
    top_p: float = option(1.0, "nucleus sampling: the smallest set of tokens holding this mass (1: all)",
                          above=0.0, at_most=1.0)
    seed: int = option(0, "the sampling noise's seed (with the prompt's index and the position)", at_least=0,
                       at_most=SEED_MAX)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Batching(Options):
    """How prompts are grouped and keyed, which no method's output depends on except through the seed of
    random guesses: batching changes no output (the tests decode batch 1 and 4 alike). Two seeds, named
    as two: `guess_seed` keys random initial guesses (init random-vocab, prefix-sample), Sampling.seed the
    sampling noise; each is combined with the prompt's index, so a prompt decodes alike in any batch."""

    batch_size: int = option(1, "prompts decoded side by side (batching changes no output)", at_least=1)
    guess_seed: int = option(0, "the seed of random initial guesses (init random-vocab / prefix-sample)",
                             at_least=0, at_most=SEED_MAX)


BATCHING_FIELDS = tuple(field.name for field in dataclasses.fields(Batching))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeOptions(Options):
    """What every method takes."""

    max_new_tokens: int = option(128, "tokens to generate per prompt (the EOS included)", at_least=1)
    eos_id: int | None = option(None, "stop a row at this token (None: only the budget)", at_least=0)
    sampling: Sampling = Sampling()

    @property
    def lookahead(self) -> int:
        """Cache slots a pass may write past the committed text."""
        return 1

    def cache_shape(self, batch: int, slots: int) -> tuple[int, int]:
        """(rows, slots) of the KV cache for `batch` prompts needing `slots` positions."""
        return batch, slots

    @property
    def candidate_rows(self) -> int:
        """Rows a pass verifies per cache row: recycling methods verify each pooled candidate on a row
        of its own, with a copy of the cache."""
        return 1 + getattr(self, "recycle", 0)

    @property
    def pass_tokens(self) -> int:
        """Tokens one row feeds a pass (a drafting tree feeds more than its window)."""
        return self.lookahead

    def working_bytes(self, config, batch: int, slots: int) -> int:
        """A lower bound on the memory one pass needs: every KV cache row it copies, and the float32
        logits and attention scores of its window. A bound, not a measure: it only refuses settings
        that cannot run, before XLA tries to allocate them."""
        rows, slots = self.cache_shape(batch, slots)
        rows *= self.candidate_rows
        itemsize = 2 if "bfloat16" in str(config.compute_dtype) else 4
        cache = 2 * config.num_layers * rows * slots * config.num_kv_heads * config.head_dim * itemsize
        window = rows * self.pass_tokens
        return cache + 4 * window * (config.vocab_size + config.num_heads * slots)


# The guess for the not-yet-decoded tokens of a block (cllm_jax/decode/guess.py). Any guess reaches the
# same fixed point; lookup reaches it in the fewest passes on every set measured, prefix-sample is
# the reference's (and what trajectory collection uses, so that training data match the paper's).
INIT_STRATEGIES = ("lookup", "prefix-sample", "pad", "repeat-last", "random-vocab")


@dataclasses.dataclass(frozen=True, kw_only=True)
class JacobiOptions(DecodeOptions):
    """What every Jacobi method takes."""

    block_size: int = option(16, "Jacobi block (window) size n", at_least=1)
    init: str = option("lookup", "initial guesses of a block's undecided tokens", choices=INIT_STRATEGIES)
    pad_id: int = option(0, "the guessed token of init=pad", at_least=0)

    @property
    def lookahead(self) -> int:
        return self.block_size
