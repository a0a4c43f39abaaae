"""Jacobi trajectory records and their collection directories: the public names, by role.

  records.py    the record (reference schema) and its normalisation of the reference's JSON
  augment.py    the reference's `use_aug` states, and the per-prompt random stream
  cleaning.py   dropping records whose generation collapsed into repetition
  storage.py    a collection directory: trajectories.jsonl (records only), progress.jsonl (resume
                bookkeeping), summary.json; their formats and how reopening scans them
  writer.py     the crash-safe, resumable TrajectoryWriter
  reading.py    read_trajectories: our directories and JSONL, the reference's released files
  shards.py     sharded collection and the byte-exact merge
"""

from cllm_jax.data.augment import augment_trajectory, prompt_rng
from cllm_jax.data.cleaning import drop_repetitive, has_repetition
from cllm_jax.data.reading import read_trajectories
from cllm_jax.data.records import TrajectoryRecord
from cllm_jax.data.shards import merge_shards, shard_examples
from cllm_jax.data.storage import (FORMAT, LEGACY_FORMAT, PROGRESS_FILE, SUMMARY_FILE, TRAJECTORIES_FILE,
                                   read_summary)
from cllm_jax.data.writer import TrajectoryWriter

__all__ = [
    "FORMAT", "LEGACY_FORMAT", "PROGRESS_FILE", "SUMMARY_FILE", "TRAJECTORIES_FILE", "TrajectoryRecord",
    "TrajectoryWriter", "augment_trajectory", "drop_repetitive", "has_repetition", "merge_shards",
    "prompt_rng", "read_summary", "read_trajectories", "shard_examples",
]
