"""Python-side orchestration around the jitted decoding functions.

Batches prompts, pads them to length buckets and a fixed batch size (so one compiled function
serves many prompts), compiles ahead of time to report compile time apart from generation time,
reuses the donated KV cache between calls, and turns device arrays into per-prompt results.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from cllm_jax.decode.options import BATCHING_FIELDS, Batching, DecodeOptions
from cllm_jax.decode.prefill import bucket_length, cache_length_for, make_prompt_batch
from cllm_jax.decode.registry import get_method
from cllm_jax.decode.state import DecodeOutput
from cllm_jax.errors import ConfigError, InputError
from cllm_jax.model.kv_cache import KVCache
from cllm_jax.model.interface import CausalLM
from cllm_jax.parallel import decode_mesh, distributed


@dataclasses.dataclass(frozen=True, kw_only=True)
class Generation:
    """One prompt's result and its metrics (cllm_jax/decode/jacobi.py and window.py define them)."""

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
    acceptance: list[list[int]] | None = None  # drafting methods: passes by accepted length (state.DecodeOutput)

    @property
    def tokens_per_forward(self) -> float:
        return len(self.token_ids) / max(1, self.forward_passes)

    @property
    def iterations_per_block(self) -> float:
        # The prefill pass produced the first token; every later pass belongs to a block.
        return (self.forward_passes - 1) / self.blocks if self.blocks else 0.0


def check_memory(nbytes: int, what: str, fix: str) -> None:
    """Refuse an allocation larger than the memory the device has left, before XLA tries it."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return
    if nbytes > free:
        raise InputError(f"{what} needs {_size(nbytes)} but {_size(free)} are free: {fix}")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


class Decoder:
    """Decode lists of token-id prompts with one method; compiled functions are cached per shape.

    Decoder(model, "jacobi-rolling", block_size=8, max_new_tokens=256, batch_size=4): the keyword
    values are the method's options (cllm_jax/decode/registry.py), or pass `options=` built already,
    and the Batching fields (batch_size, guess_seed), which no method's options hold.
    With a `mesh` (default: the one decode_mesh.activate set, if any) the model moves onto it, in place.
    """

    def __init__(self, model: CausalLM, method: str = "ar", *, options: DecodeOptions | None = None, mesh=None,
                 **values):
        self.model = model
        self.method = get_method(method)
        batching = Batching(**{name: values.pop(name) for name in BATCHING_FIELDS if name in values})
        if options is not None and values:
            raise ConfigError("pass the options either as `options=` or as keyword values, not both")
        self.options = options if options is not None else self.method.make_options(**values)
        if not isinstance(self.options, self.method.options):
            raise ConfigError(f"method {method} takes {self.method.options.__name__}, "
                              f"not {type(self.options).__name__}")
        if self.method.needs_adapter and getattr(model, "adapter", None) is None:
            raise ConfigError(f"method {method} drafts with an adapter but the model has none: load one "
                              f"(decode.py --draft-adapter DIR) or train one (train.adapter)")
        batch_size = self.batch_size = batching.batch_size
        self.guess_seed = batching.guess_seed
        self._compiled: dict[tuple, object] = {}
        self._caches: dict[tuple, KVCache] = {}
        self.mesh = decode_mesh.active() if mesh is None else mesh
        self._cache_shape(batch_size, bucket_length(1))  # the smallest cache this decoder can need must fit
        if self.mesh is not None:  # after the check: a model that does not fit is refused before it moves
            notes = decode_mesh.place_model(model, self.mesh)
            rows = self.options.cache_shape(batch_size, 1)[0]
            notes += decode_mesh.cache_specs(model.config, rows, 1, self.mesh)[1]
            if batch_size % self.mesh.shape["data"]:
                notes.append(f"prompts ({batch_size} per batch over data={self.mesh.shape['data']})")
            decode_mesh.say_replicated(notes, self.mesh)

    def _cache_shape(self, batch: int, bucket: int) -> tuple[int, int]:
        o, config = self.options, self.model.config
        shape = o.cache_shape(batch, cache_length_for(bucket, o.max_new_tokens, o.lookahead))
        if self.mesh is not None:
            if shape not in self._caches:
                decode_mesh.check_fits(self.model, *shape, self.mesh)
            return shape
        itemsize = jnp.dtype(config.compute_dtype).itemsize
        cache = 2 * config.num_layers * shape[0] * shape[1] * config.num_kv_heads * config.head_dim * itemsize
        # The prefill's fp32 attention scores and probabilities, every query of the padded prompts over every
        # slot: quadratic in the prompt, they outgrow the cache for prompts of a few thousand tokens.
        prefill = 2 * 4 * batch * config.num_heads * bucket * shape[1]
        check_memory((0 if shape in self._caches else cache) + prefill,
                     f"the KV cache for {shape[0]} rows of {shape[1]} positions and the prefill of {bucket}-token "
                     f"prompts", "lower the batch size, the number of new tokens or the prompts' length")
        return shape

    def _cache(self, batch: int, bucket: int) -> tuple[tuple[int, int], KVCache]:
        shape = self._cache_shape(batch, bucket)
        cached = self._caches.pop(shape, None)
        if cached is None and self.mesh is not None:
            cached = decode_mesh.zeros_cache(self.model.config, *shape, self.mesh)
        return shape, cached or KVCache.zeros(self.model.config, *shape)

    def _run(self, batch, key) -> tuple[DecodeOutput, float, float]:
        shape, cache = self._cache(len(batch.lengths), batch.tokens.shape[1])
        args = [self.model, batch.tokens, batch.lengths, batch.row_seeds, cache, key]
        mesh = self.mesh
        if mesh is not None:  # rows over data, the key replicated: the method's jit partitions the rest
            args[1:4] = [decode_mesh.put_rows(a, mesh) for a in args[1:4]]
            args[5] = decode_mesh.put_replicated(key, mesh)
        signature = (batch.tokens.shape, shape)
        compile_seconds = 0.0
        if signature not in self._compiled:
            start = time.perf_counter()
            if mesh is None:
                self._compiled[signature] = self.method.generate.lower(*args, options=self.options).compile()
            else:
                # explicit output shardings: the returned cache keeps the layout the next call's executable expects
                fn = functools.partial(self.method.generate, options=self.options)
                out = decode_mesh.output_shardings(jax.eval_shape(fn, *args),
                                                   decode_mesh.cache_sharding(self.model.config, *shape, mesh), mesh)
                self._compiled[signature] = jax.jit(fn, out_shardings=out, donate_argnums=4).lower(*args).compile()
            compile_seconds = time.perf_counter() - start
        start = time.perf_counter()
        out = jax.block_until_ready(self._compiled[signature](*args))
        seconds = time.perf_counter() - start
        self._caches[shape] = out.cache  # the input cache was donated; keep the returned one for reuse
        if mesh is not None:  # every process reads every row (collective across processes)
            out = distributed.to_host(dataclasses.replace(out, cache=None))
        return out, seconds, compile_seconds

    def generate_batches(self, prompts: list[list[int]], row_seeds: list[int] | None = None) -> Iterator[list[Generation]]:
        """Yield results batch by batch (for progress bars and incremental writing).

        `row_seeds` (default: the prompts' indices) key each prompt's random guesses and sampling
        noise, so a prompt decodes the same in any batch, shard or resumed run.
        """
        o, config, size = self.options, self.model.config, self.batch_size
        key = jax.random.key(self.guess_seed)
        row_seeds = list(range(len(prompts))) if row_seeds is None else list(row_seeds)
        longest = max((len(p) for p in prompts), default=0)
        # the largest cache and prefill this call needs fit (or one line says so) before anything is built; a
        # prompt beyond the context is left to make_prompt_batch, whose line names the prompt
        if prompts and longest + o.max_new_tokens + o.lookahead <= config.max_position_embeddings:
            self._cache_shape(size, bucket_length(longest))
        for start in range(0, len(prompts), size):
            chunk = prompts[start : start + size]
            # Pad the last batch with copies of its first prompt: one batch size, one compilation.
            padded = chunk + [chunk[0]] * (size - len(chunk))
            seeds = row_seeds[start : start + len(chunk)]
            seeds += [seeds[0]] * (size - len(chunk))
            batch = make_prompt_batch(
                padded, config.vocab_size, config.max_position_embeddings, o.max_new_tokens + o.lookahead, seeds
            )
            out, seconds, compile_seconds = self._run(batch, key)
            timing = (seconds, compile_seconds, start // size)
            yield [self._result(out, i, chunk[i], *timing) for i in range(len(chunk))]

    def generate(self, prompts: list[list[int]], row_seeds: list[int] | None = None,
                 on_batch: Callable[[list[Generation]], object] = lambda batch: None) -> list[Generation]:
        """Every prompt's result; on_batch sees each batch as it finishes (a caller's progress bar)."""
        results = []
        for batch in self.generate_batches(prompts, row_seeds):
            results += batch
            on_batch(batch)
        return results

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
            acceptance=None if out.acceptance is None else np.asarray(out.acceptance[row]).tolist(),
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
