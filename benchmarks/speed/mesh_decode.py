"""Decoding over a device mesh: per-device bytes of weights and KV cache, and the time of a pass, at
mesh sizes 1, 2, 4, 8 (tensor=T by default, or data=D with --axis data).

The bytes are read from the arrays' shards on one device after decoding, not computed from the
configuration: the sharded parts must fall as 1/T (norms stay whole). A pass is AR decoding's
seconds over its forward passes (the prefill's included), best of --repeats. Without accelerators
the devices are simulated on the CPU (XLA_FLAGS=--xla_force_host_platform_device_count=8, set in a
subprocess before JAX starts): they share the host's cores, so their pass times show the cost of
the collectives, not a speedup; real timings need as many accelerators as the mesh.

    python benchmarks/speed/mesh_decode.py [--shape small|7b] [--axis tensor|data] [--sizes 1,2,4,8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402

SHAPES = {  # random weights of these shapes (hidden, intermediate, layers, heads, kv heads, head dim, vocab)
    "small": (512, 1536, 4, 8, 8, 64, 16384),
    "7b": (4096, 11008, 32, 32, 32, 128, 32000),
}


def worker(args) -> list[dict]:
    import jax
    from flax import nnx

    from cllm_jax.config import ModelConfig
    from cllm_jax.decode.engine import Decoder
    from cllm_jax.model.llama import Llama
    from cllm_jax.parallel import decode_mesh

    hidden, inter, layers, heads, kv, dim, vocab = SHAPES[args.shape]
    config = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                         num_heads=heads, num_kv_heads=kv, head_dim=dim, max_position_embeddings=4096,
                         dtype=args.dtype, param_dtype=args.dtype)
    prompt = [[3 + (7 * i) % (vocab - 3) for i in range(args.prompt)]] * args.batch
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        if size > jax.device_count():
            continue
        with jax.default_device(jax.local_devices(backend="cpu")[0]):  # as decode.py --mesh loads: on the host
            model = Llama(config, rngs=nnx.Rngs(0))
        shape = (1, size) if args.axis == "tensor" else (size, 1)
        mesh = decode_mesh.make_decode_mesh(*shape, devices=jax.devices()[:size])
        decoder = Decoder(model, "ar", batch_size=args.batch, mesh=mesh, max_new_tokens=args.new_tokens)
        decoder.generate(prompt)  # compiles
        timing = harness.best_of(lambda: decoder.generate(prompt), args.repeats, warmup=0)
        (result,) = decoder.generate(prompt)[:1]
        device = mesh.devices.flat[0]

        def on_device(tree):
            return sum(s.data.nbytes for a in jax.tree.leaves(tree) for s in a.addressable_shards if s.device == device)

        (cache,) = decoder._caches.values()
        rows.append({"mesh": decode_mesh.describe(mesh), "devices": size,
                     "weight_bytes": on_device(nnx.state(model)), "cache_bytes": on_device(cache),
                     "pass_seconds": timing["best"] / result.forward_passes, "passes": result.forward_passes})
    base = rows[0]
    for row in rows:
        row["weight_ratio"] = row["weight_bytes"] / base["weight_bytes"]
        row["cache_ratio"] = row["cache_bytes"] / base["cache_bytes"]
        row["pass_ratio"] = row["pass_seconds"] / base["pass_seconds"]
    return rows


def main() -> None:
    parser = harness.parser(__doc__, out="reports/bench/mesh_decode.json")
    parser.add_argument("--shape", default="small", choices=list(SHAPES))
    parser.add_argument("--axis", default="tensor", choices=["tensor", "data"])
    parser.add_argument("--sizes", default="1,2,4,8")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    import jax

    if jax.default_backend() != "cpu" and jax.device_count() >= max(int(s) for s in args.sizes.split(",")):
        rows = worker(args)
    else:  # simulated devices: the flag must be set before JAX starts, so in a fresh process
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()}
        proc = subprocess.run([sys.executable, __file__, "--worker", *sys.argv[1:]], env=env, capture_output=True,
                              text=True)
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        rows = json.loads(proc.stdout.strip().splitlines()[-1])
    print(table(rows))
    harness.write(args.out, rows, args)


def table(rows: list[dict]) -> str:
    shown = [r | {"weight_mib": r["weight_bytes"] / 2**20, "cache_mib": r["cache_bytes"] / 2**20,
                  "pass_ms": 1000 * r["pass_seconds"]} for r in rows]
    return harness.table(shown, [("mesh", "mesh", ""), ("weights / device (MiB)", "weight_mib", ".2f"),
                                 ("x size 1", "weight_ratio", ".3f"), ("KV cache / device (MiB)", "cache_mib", ".2f"),
                                 ("x size 1", "cache_ratio", ".3f"), ("pass (ms)", "pass_ms", ".2f"),
                                 ("x size 1", "pass_ratio", ".2f")])


if __name__ == "__main__":
    main()
