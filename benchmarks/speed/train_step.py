"""Consistency-training step time and tokens/s for SmolLM2-135M, single device against sharded.

Synthetic trajectories with real shapes: a prompt, then `--blocks` blocks of `--block-size` tokens.
  per_record  one block record per row (the reference layout: student + AR passes, the target
              taken from the AR pass), prefix = prompt + earlier blocks
  packed      one row per prompt: all its blocks in one forward/backward (cllm_jax/train/packing.py)
Reported per configuration: compile time, median step time (of `--steps` timed steps after an
untimed one), tokens/s (all tokens fed through the model), block records/s (the training signal)
and its ratio to the reference layout on one device, and on a GPU the model FLOPs utilisation
(6 x params per trained token, 2 x per forward-only token, plus full T x T attention; remat
recomputation not counted, as usual for MFU).

The sharded runs re-execute this script with JAX_NUM_CPU_DEVICES=8 (simulated devices on the same
cores: it measures the overhead of the partitioned program, not a speed-up).

    python benchmarks/speed/train_step.py [--steps 3] [--meshes 1x8x1,2x2x2] [--out reports/bench/train_step.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402

import numpy as np  # noqa: E402

PEAK_TFLOPS = {  # dense tensor-core peaks (bf16, tf32 for fp32), per device
    ("H100", "bfloat16"): 989, ("H100", "float32"): 494, ("H200", "bfloat16"): 989, ("H200", "float32"): 494,
    ("A100", "bfloat16"): 312, ("A100", "float32"): 156,
}


def synthetic_records(vocab: int, prompt_len: int, blocks: int, n: int, prompts: int, seed: int = 0):
    from cllm_jax.data.trajectories import TrajectoryRecord

    rng = np.random.default_rng(seed)
    out = []
    for p in range(prompts):
        prefix = tuple(int(t) for t in rng.integers(3, vocab, prompt_len))
        for k in range(blocks):
            fixed = tuple(int(t) for t in rng.integers(3, vocab, n))
            states = [fixed[: j + 1] + tuple(int(t) for t in rng.integers(3, vocab, n - j - 1)) for j in range(n // 2)]
            out.append(TrajectoryRecord(p, k, prompt_len, prefix, tuple(states) + (fixed,), prefix + fixed,
                                        prefix + fixed))
            prefix = prefix + fixed
    return out


def model_flops(config, hb, layout: str) -> float:
    """Model FLOPs of one step: matmul params x tokens (6 trained / 2 forward-only) + attention."""
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_layers
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    per_token = layers * (d * (q + 2 * kv) + q * d + 3 * d * f) + d * config.vocab_size
    flops = 0.0
    keys = ["tokens"] if layout == "packed" else ["student_tokens", "ar_tokens"]
    for key in keys:
        time_len = hb.arrays[key].shape[-1]
        rows = hb.arrays[key].shape[0] * hb.arrays[key].shape[1]
        flops += 6 * (per_token * time_len + layers * 2 * time_len * time_len * q) * rows
    if "target_tokens" in hb.arrays:
        t = hb.arrays["target_tokens"]
        flops += 2 * (per_token * t.shape[-1] + layers * 2 * t.shape[-1] ** 2 * q) * t.shape[0] * t.shape[1]
    return flops


def measure(layout: str, mesh_shape, args) -> dict:
    import jax
    from flax import nnx

    from cllm_jax.parallel import distributed
    from cllm_jax.parallel import mesh as mesh_lib
    from cllm_jax.train import step as step_lib
    from cllm_jax.train.batching import BatchSpec, DataSource
    from cllm_jax.train.config import OptimSection
    from cllm_jax.weights.load import load_model

    model = load_model(None, dtype=args.dtype).model
    config = model.config
    records = synthetic_records(config.vocab_size, args.prompt_len, args.blocks, args.block_size, args.prompts)
    spec = BatchSpec(layout=layout, max_seq_len=4096, pad_multiple=64, shuffle=False)
    data = DataSource(records, spec)
    mesh = mesh_lib.single_device_mesh() if mesh_shape is None else mesh_lib.make_mesh(*mesh_shape)
    batch_size = max(args.batch_size, mesh_lib.batch_divisor(mesh))
    graphdef, params = nnx.split(model)
    tx, schedule = step_lib.make_optimizer(OptimSection(lr=2e-5), 100)
    shardings = step_lib.state_shardings(params, tx, mesh)
    state = step_lib.init_state(jax.device_get(params), tx, shardings)
    del params, model
    options = step_lib.StepOptions(layout=layout, shared_target=spec.shared_target, remat=True)
    # the same (longest) batch every step: per-record rows are the last blocks of each prompt
    cursor = len(data) - batch_size if layout == "per_record" else 0
    hb = data.batch(0, cursor, (1, batch_size))
    batch = {k: distributed.global_array(v, mesh_lib.batch_sharding(mesh, v.ndim), v.shape) for k, v in hb.arrays.items()}
    fn = step_lib.compile_train_step(graphdef, tx, schedule, options, mesh, shardings,
                                     {k: v.ndim for k, v in hb.arrays.items()})
    t0 = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    carry = {"state": state}  # the state is donated: each step takes the one the last returned

    def one_step():
        carry["state"], carry["metrics"] = compiled(carry["state"], batch)
        jax.block_until_ready(carry["metrics"])

    step_s = harness.best_of(one_step, args.repeats)["median"]  # the untimed first step pays one-off allocations
    blocks = sum(len(data.examples[s].records) if layout == "packed" else 1
                 for s in range(cursor, cursor + batch_size))
    row = {"layout": layout, "mesh": "x".join(map(str, mesh.devices.shape)), "devices": mesh.devices.size,
           "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind, "dtype": args.dtype,
           "batch_rows": batch_size, "seq_len": max(v.shape[-1] for v in hb.arrays.values()),
           "tokens_per_step": hb.tokens, "blocks_per_step": blocks, "compile_s": compile_s, "step_s": step_s,
           "tokens_per_s": hb.tokens / step_s, "blocks_per_s": blocks / step_s,
           "loss": float(carry["metrics"]["loss"])}
    if jax.default_backend() == "gpu":
        kind = next((k for k in ("H200", "H100", "A100") if k in jax.devices()[0].device_kind), None)
        peak = args.peak_tflops or PEAK_TFLOPS.get((kind, args.dtype))
        if peak:
            row["mfu"] = model_flops(config, hb, layout) / step_s / (peak * 1e12 * mesh.devices.size)
    return row


def main() -> None:
    parser = harness.parser(__doc__, out="reports/bench/train_step.json")
    parser.add_argument("--steps", dest="repeats", type=int, default=argparse.SUPPRESS,
                        help="timed steps per configuration, the median kept (the same as --repeats)")
    parser.add_argument("--layouts", default="per_record,packed")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=4, help="blocks per prompt")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1, help="rows per step (raised to the mesh's data x fsdp)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--meshes", default="1x8x1,2x2x2",
                        help="sharded meshes on 8 simulated CPU devices ('' skips). 8x1x1 replicates parameters "
                             "and Adam state 8 times (about 13 GB for SmolLM2): it does not fit a 24 GB host")
    parser.add_argument("--peak-tflops", type=float, help="per-device peak for MFU (default: by device kind)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    layouts = args.layouts.split(",")

    if args.worker:  # child: one mesh, every layout, JSON rows on stdout
        shape = tuple(int(x) for x in args.worker.split("x"))
        print(json.dumps([measure(layout, shape, args) for layout in layouts]))
        return

    import jax

    rows = []
    meshes = [None] + ([(-1, 1, 1), (1, -1, 1)] if jax.device_count() > 1 else [])  # real devices: all of them
    for shape in meshes:
        for layout in layouts:
            rows.append(measure(layout, shape, args))
            print(f"{layout} on mesh {rows[-1]['mesh']}: {rows[-1]['step_s']:.3f} s/step", flush=True)
    if jax.default_backend() == "cpu":
        child = [f"--layouts={args.layouts}", f"--prompt-len={args.prompt_len}", f"--blocks={args.blocks}",
                 f"--block-size={args.block_size}", f"--prompts={args.prompts}", f"--batch-size={args.batch_size}",
                 f"--repeats={args.repeats}", f"--dtype={args.dtype}"]
        for mesh in filter(None, args.meshes.split(",")):
            env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}
            proc = subprocess.run([sys.executable, __file__, *child, f"--worker={mesh}"], env=env,
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"error: the {mesh} run failed:\n{proc.stderr[-2000:]}")
            for row in json.loads(proc.stdout.strip().splitlines()[-1]):
                rows.append(row)
                print(f"{row['layout']} on mesh {row['mesh']} (simulated): {row['step_s']:.3f} s/step", flush=True)
    for row in rows:  # against the reference layout on one device
        row["blocks_ratio"] = row["blocks_per_s"] / rows[0]["blocks_per_s"]
    print(harness.table(rows, [("layout", "layout", ""), ("mesh", "mesh", ""), ("rows", "batch_rows", "d"),
                               ("T", "seq_len", "d"), ("compile s", "compile_s", ".1f"), ("step s", "step_s", ".3f"),
                               ("tokens/s", "tokens_per_s", ".0f"), ("blocks/s", "blocks_per_s", ".2f"),
                               (f"blocks/s x {rows[0]['layout']} on 1 device", "blocks_ratio", ".2f"),
                               ("MFU", "mfu", ".1%")]))
    harness.write(args.out, rows, args)


if __name__ == "__main__":
    main()
