"""Python-side orchestration around the jitted decoding functions.

Batches prompts, pads them to length buckets and a fixed batch size (so one compiled function
serves many prompts), compiles ahead of time to report compile time apart from generation time,
reuses the donated KV cache between calls, and turns device arrays into per-prompt results.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator

import jax
import numpy as np

from cllm_jax.decode.autoregressive import AROptions, DecodeOutput, generate_autoregressive
from cllm_jax.decode.jacobi import JacobiOptions, generate_jacobi
from cllm_jax.decode.multiblock import MultiblockOptions, generate_multiblock
from cllm_jax.decode.prefill import cache_length_for, make_prompt_batch
from cllm_jax.decode.rolling import generate_rolling_jacobi
from cllm_jax.decode.sampling import Sampling
from cllm_jax.model.kv_cache import KVCache
from cllm_jax.model.llama import Llama

METHODS = ("ar", "jacobi", "jacobi-rolling", "jacobi-multiblock")


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    method: str = "ar"
    max_new_tokens: int = 128
    block_size: int = 16
    init: str = "prefix-sample"
    sampling: Sampling = Sampling()
    eos_id: int | None = None
    pad_id: int = 0
    batch_size: int = 1
    record: bool = False
    seed: int = 0
    blocks: int = 2  # jacobi-multiblock: K blocks in flight
    spawn_ratio: float = 0.85  # jacobi-multiblock: spawn a block when the newest has ceil(r * n) accepted
    recycle: int = 0  # jacobi-rolling / jacobi-multiblock: rejected tails verified per pass (0: off)

    @property
    def multiblock(self) -> bool:
        # Rolling Jacobi with recycling is multiblock decoding with one block (identical otherwise).
        return self.method == "jacobi-multiblock" or (self.method == "jacobi-rolling" and self.recycle > 0)

    def options(self) -> AROptions | JacobiOptions | MultiblockOptions:
        if self.method == "ar":
            return AROptions(self.max_new_tokens, self.eos_id, self.sampling)
        jacobi = JacobiOptions(
            self.max_new_tokens, self.block_size, self.init, self.eos_id, self.pad_id, self.sampling,
            self.record and self.method == "jacobi",
        )  # fmt: skip
        if self.multiblock:
            blocks = self.blocks if self.method == "jacobi-multiblock" else 1
            return MultiblockOptions(jacobi, blocks, self.spawn_ratio, self.recycle)
        return jacobi

    @property
    def lookahead(self) -> int:
        if self.method == "ar":
            return 1
        return self.block_size * (self.blocks if self.method == "jacobi-multiblock" else 1)


@dataclasses.dataclass(frozen=True)
class Generation:
    """One prompt's result and the metrics of cllm-reference.md."""

    prompt_ids: list[int]
    token_ids: list[int]
    forward_passes: int
    blocks: int
    fast_forwarded: int
    stationary: int
    seconds: float  # wall time of the batch that held this prompt, compilation excluded
    compile_seconds: float
    batch_index: int = 0
    trajectory: list[list[list[int]]] | None = None  # per block, every state (recording only)

    @property
    def tokens_per_forward(self) -> float:
        return len(self.token_ids) / max(1, self.forward_passes)

    @property
    def iterations_per_block(self) -> float:
        # The prefill pass produced the first token; every later pass belongs to a block.
        return (self.forward_passes - 1) / self.blocks if self.blocks else 0.0


def _strategy(method: str) -> Callable[..., DecodeOutput]:
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    return {"ar": generate_autoregressive, "jacobi": generate_jacobi, "jacobi-rolling": generate_rolling_jacobi,
            "jacobi-multiblock": generate_multiblock}[method]  # fmt: skip


class Decoder:
    """Decode lists of token-id prompts with one strategy; compiled functions are cached per shape."""

    def __init__(self, model: Llama, settings: DecodeSettings):
        self.model = model
        self.settings = settings
        self._compiled: dict[tuple, object] = {}
        self._caches: dict[tuple, KVCache] = {}

    def _arguments(self, batch, key):
        s = self.settings
        args = [self.model, batch.tokens, batch.lengths, batch.row_seeds]
        shape = (len(batch.lengths), cache_length_for(batch.tokens.shape[1], s.max_new_tokens, s.lookahead))
        cache = self._caches.pop(shape, None) or KVCache.zeros(self.model.config, *shape)
        args.append(cache)
        if s.method != "ar":
            args.append(key)
        return shape, args

    def _run(self, batch, key) -> tuple[DecodeOutput, float, float]:
        fn = _strategy("jacobi-multiblock" if self.settings.multiblock else self.settings.method)
        shape, args = self._arguments(batch, key)
        signature = (batch.tokens.shape, shape)
        compile_seconds = 0.0
        if signature not in self._compiled:
            start = time.perf_counter()
            self._compiled[signature] = fn.lower(*args, options=self.settings.options()).compile()
            compile_seconds = time.perf_counter() - start
        start = time.perf_counter()
        out = jax.block_until_ready(self._compiled[signature](*args))
        seconds = time.perf_counter() - start
        self._caches[shape] = out.cache  # the input cache was donated; keep the returned one for reuse
        return out, seconds, compile_seconds

    def generate_batches(self, prompts: list[list[int]], row_seeds: list[int] | None = None) -> Iterator[list[Generation]]:
        """Yield results batch by batch (for progress bars and incremental writing).

        `row_seeds` (default: the prompts' indices) key each prompt's random guesses and sampling
        noise, so a prompt decodes the same in any batch, shard or resumed run.
        """
        s, config = self.settings, self.model.config
        key = jax.random.key(s.seed)
        row_seeds = list(range(len(prompts))) if row_seeds is None else list(row_seeds)
        for start in range(0, len(prompts), s.batch_size):
            chunk = prompts[start : start + s.batch_size]
            # Pad the last batch with copies of its first prompt: one batch size, one compilation.
            padded = chunk + [chunk[0]] * (s.batch_size - len(chunk))
            seeds = row_seeds[start : start + len(chunk)]
            seeds += [seeds[0]] * (s.batch_size - len(chunk))
            batch = make_prompt_batch(
                padded, config.vocab_size, config.max_position_embeddings, s.max_new_tokens + s.lookahead, seeds, s.pad_id
            )
            out, seconds, compile_seconds = self._run(batch, key)
            timing = (seconds, compile_seconds, start // s.batch_size)
            yield [self._result(out, i, chunk[i], *timing) for i in range(len(chunk))]

    def generate(self, prompts: list[list[int]], row_seeds: list[int] | None = None) -> list[Generation]:
        return [g for batch in self.generate_batches(prompts, row_seeds) for g in batch]

    def _result(self, out: DecodeOutput, row: int, prompt: list[int], seconds, compile_seconds, batch_index):
        length = int(out.lengths[row])
        trajectory = None
        if out.trajectory is not None:
            states = np.asarray(out.trajectory_states[row])
            blocks = np.asarray(out.trajectory[row])
            trajectory = [blocks[b, : states[b]].tolist() for b in range(int(out.blocks[row]))]
        return Generation(
            prompt_ids=list(prompt),
            token_ids=np.asarray(out.tokens[row, :length]).tolist(),
            forward_passes=int(out.forward_passes[row]),
            blocks=int(out.blocks[row]),
            fast_forwarded=int(out.fast_forwarded[row]),
            stationary=int(out.stationary[row]),
            seconds=seconds,
            compile_seconds=compile_seconds,
            batch_index=batch_index,
            trajectory=trajectory,
        )


def summarize(results: list[Generation]) -> dict:
    """Aggregate metrics: TPF over all tokens and passes, tokens/s over the distinct batches' time."""
    tokens = sum(len(r.token_ids) for r in results)
    passes = sum(r.forward_passes for r in results)
    blocks = sum(r.blocks for r in results)
    # Rows of one batch share its wall time: count each batch once.
    per_batch = {r.batch_index: (r.seconds, r.compile_seconds) for r in results}
    seconds = sum(s for s, _ in per_batch.values())
    return {
        "prompts": len(results),
        "tokens": tokens,
        "forward_passes": passes,
        "tokens_per_forward": tokens / max(1, passes),
        "iterations_per_block": (passes - len(results)) / blocks if blocks else 0.0,
        "fast_forwarded": sum(r.fast_forwarded for r in results),
        "stationary": sum(r.stationary for r in results),
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
        "compile_seconds": sum(c for _, c in per_batch.values()),
    }
