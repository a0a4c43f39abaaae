"""Collect Jacobi trajectories with the model itself: prompts in, reference-format records out.

Each prompt is decoded with fixed-block Jacobi decoding in recording mode; each converged block
becomes one record whose "prompt" is the original prompt plus the blocks before it. Randomness (the
initial guesses, augmentation) is keyed by the prompt's position in the full prompt list, so a
resumed, sharded or differently batched run writes byte-identical records.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from cllm_jax.data.augment import augment_trajectory, prompt_rng
from cllm_jax.data.cleaning import drop_repetitive
from cllm_jax.data.prompts import PromptExample
from cllm_jax.data.reading import read_trajectories
from cllm_jax.data.records import TrajectoryRecord
from cllm_jax.data.shards import shard_examples
from cllm_jax.data.storage import read_summary
from cllm_jax.data.writer import TrajectoryWriter
from cllm_jax.decode.engine import Decoder, Generation
from cllm_jax.decode.jacobi import FixedBlockOptions
from cllm_jax.decode.options import Batching, JacobiOptions, Options, option, option_like
from cllm_jax.errors import ConfigError, DataError
from cllm_jax.weights.load import LoadedModel


@dataclasses.dataclass(frozen=True, kw_only=True)
class CollectOptions(Options):
    """The reference's defaults: block 16, 256 new tokens, prefix-sample guesses, no augmentation,
    repetition cleaning on. The decoding values are checked as fixed-block Jacobi's options."""

    block_size: int = option_like(JacobiOptions, "block_size")
    max_new_tokens: int = option_like(JacobiOptions, "max_new_tokens", default=256)
    use_aug: bool = option(False, "add partly corrected states (the reference's use_aug)")
    clean: bool = option(True, "drop records whose output repeats one token 10 times")
    init: str = option_like(JacobiOptions, "init", default="prefix-sample",
                            help="initial guesses (the training data's states depend on it: the paper's prefix-sample)")
    chat: bool = option(True, "apply the model's chat template")
    # named `seed` in the collection (its summary.json records it, and resuming compares it)
    seed: int = option_like(Batching, "guess_seed", help="the seed of random guesses and augmented states")
    batch_size: int = option_like(Batching, "batch_size", default=4)
    method: str = option("jacobi", "jacobi: trajectories (the consistency objective's data); ar: the greedy text "
                         "alone, by batched AR (all the placeholder drafter needs, in fewer passes)",
                         choices=("jacobi", "ar"))

    def decoder(self, model, eos_id: int | None = None, pad_id: int | None = None) -> Decoder:
        if self.method == "ar":
            return Decoder(model, "ar", batch_size=self.batch_size, max_new_tokens=self.max_new_tokens, eos_id=eos_id)
        options = FixedBlockOptions(max_new_tokens=self.max_new_tokens, block_size=self.block_size, init=self.init,
                                    eos_id=eos_id, pad_id=pad_id or 0, record=True)
        return Decoder(model, "jacobi", options=options, batch_size=self.batch_size, guess_seed=self.seed)


def model_fingerprint(loaded: LoadedModel) -> dict:
    """Names the weights, not the path: the same model moved elsewhere still resumes its runs."""
    digest = hashlib.blake2b(digest_size=16)
    for leaf in jax.tree.leaves(loaded.model):
        digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    return {"config": loaded.config.to_hf(), "weights_blake2b": digest.hexdigest()}


def prompt_ids(loaded: LoadedModel, example: PromptExample, chat: bool) -> list[int]:
    tokenizer = loaded.tokenizer
    use_chat = chat and tokenizer.has_chat_template
    return tokenizer.chat_ids(example.prompt) if use_chat else tokenizer.encode(example.prompt)


def records_for(
    data_id, ids: list[int], generation: Generation, labels: list[int] | None, options: CollectOptions, rng, eos
) -> tuple[list[TrajectoryRecord], int]:
    """One record per converged block (reference schema); returns (kept records, records dropped).

    A generation without a trajectory (collected by AR) is one record whose single state is the
    whole generation: the fixed point with no iterations before it."""
    complete = ids + generation.token_ids
    prefix, records = list(ids), []
    trajectory = generation.trajectory if generation.trajectory is not None else [[generation.token_ids]]
    for block_index, states in enumerate(trajectory):
        fixed_point = states[-1]
        if options.use_aug:
            states = augment_trajectory(states, rng)
        records.append(
            TrajectoryRecord(
                data_id=data_id,
                jacobian_itr_id=block_index,
                prompt_ids_len=len(ids),
                prompt_ids=prefix,
                answer_trajectory_ids=states,
                teacher_output_ids=prefix + fixed_point,
                complete_teacher_output_ids=complete,
                labels_ids=labels,
            )
        )
        prefix = prefix + fixed_point
    return drop_repetitive(records, eos) if options.clean else (records, 0)


def collect(
    loaded: LoadedModel,
    examples: Sequence[PromptExample],
    out_dir: str | Path,
    options: CollectOptions,
    source: str,
    shard: tuple[int, int] | None = None,
    on_batch: Callable[[list[Generation], int], None] | None = None,
) -> dict:
    """Collect into out_dir (resuming what is there); returns the run summary.

    `shard` (index, count) keeps the prompts at positions i with i % count == index; by default a
    multi-process JAX run (jax.distributed) shards by process. `on_batch(results, prompts_left)` is
    called after every batch, for progress display.
    """
    if not examples:
        raise DataError(f"{source} holds no prompts: nothing to collect (the directory is not marked "
                        f"complete); give a prompt file with one {{\"prompt\": ...}} per line")
    if shard is None and jax.process_count() > 1:
        shard = (jax.process_index(), jax.process_count())
    index, count = shard or (0, 1)
    eos = loaded.tokenizer.eos_token_id
    fingerprint = {
        "model": model_fingerprint(loaded),
        "options": dataclasses.asdict(options) | {"batch_size": None},  # batching does not change records
        "source": source,
        "prompts": len(examples),
    }
    with TrajectoryWriter(out_dir, fingerprint, shard=shard) as writer:
        todo = [(pos, ex) for pos, ex in shard_examples(examples, index, count) if ex.data_id not in writer.done_ids]
        decoder = options.decoder(loaded.model, eos, loaded.tokenizer.pad_token_id)
        ids = [prompt_ids(loaded, ex, options.chat) for _, ex in todo]
        done = 0
        for results in decoder.generate_batches(ids, row_seeds=[pos for pos, _ in todo]):
            for (pos, example), prompt, result in zip(todo[done:], ids[done:], results):
                labels = prompt + loaded.tokenizer.encode(example.answer) + [eos] if example.answer else None
                rng = prompt_rng(options.seed, pos)
                records, dropped = records_for(example.data_id, prompt, result, labels, options, rng, eos)
                writer.write_prompt(pos, example.data_id, records, dropped=dropped)
            done += len(results)
            if on_batch is not None:
                on_batch(results, len(todo) - done)
        writer.close(complete=True)
        return summarize_collection(out_dir)


def summarize_collection(out_dir: str | Path) -> dict:
    """Records, mean states per block, mean iterations per block, records dropped by cleaning."""
    records = list(read_trajectories(out_dir))
    summary = read_summary(Path(out_dir)) or {}
    states = [len(r.answer_trajectory_ids) for r in records]
    augmented = summary.get("fingerprint", {}).get("options", {}).get("use_aug", False)
    return {
        "records": len(records),
        "prompts": summary.get("counts", {}).get("prompts", 0),
        "mean_states_per_block": float(np.mean(states)) if states else 0.0,
        # Without augmentation a block's states are s_0 .. s_(T-1) for T iterations (the last one
        # only confirms the fixed point); augmented states are not iterations.
        "mean_iterations_per_block": None if augmented else (float(np.mean(states)) if states else 0.0),
        "dropped_by_cleaning": summary.get("counts", {}).get("dropped_repetitive", 0),
    }
