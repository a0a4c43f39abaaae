"""Decoding and training speed on named model shapes, against transformers and the hardware's limits.

Random weights of the real shapes, created on the device (nothing to download or transfer). Per shape:
  ar           our autoregressive decoding (one jitted while_loop, batch 1): tokens/s, ms/token, for
               each layer loop (scan over stacked weights, per-layer arrays; `auto` marks the default)
  pass_ms      one forward pass of n tokens against the KV cache, n = 1, 8, 16, 32, 64 (a Jacobi
               iteration of block size n; n = 1 is an AR step), measured as a jitted loop of passes
  decode       the whole decoding loop of rolling Jacobi with lookup guesses (the fastest exact method
               measured on the CPU) at n = 8 and 16: ms per forward pass, verification and guessing
               included, and its break-even TPF = that / our AR's ms per token. Random weights make the
               TPF itself meaningless; a trained model's TPF (device-independent) over the break-even
               is its speedup on this device.
  transformers `generate` (torch, greedy, same shape and dtype; CPU torch on a CPU) with the dynamic
               and the static cache (on CUDA transformers compiles the static-cache forward itself)
  roofline     bytes read per token (weights except the embedding lookup, plus the KV cache filled
               on average) / peak memory bandwidth, and the share of it our AR reaches
  train        a training step (forward + backward + AdamW, packed causal rows): tokens/s and MFU
               = model FLOPs (6 x matmul params x tokens + 12 x layers x T^2 x q_dim per row) / step
               time / peak FLOPs. The model part of the consistency step (benchmarks/speed/train_step.py
               times the step with its losses and data layouts).

    python benchmarks/speed/accelerator.py                 # the three shapes; <= 8 min on one H100/H200
    python benchmarks/speed/accelerator.py --shapes tiny   # a tiny shape: a CPU check (< 2 min)
    python benchmarks/speed/accelerator.py --bandwidth 3350 --peak-tflops 989 --out reports/accelerator.json

Peak tables cover H100/H200/A100 by device name; --bandwidth (GB/s) and --peak-tflops override.
A time budget (--budget-s) skips the remaining optional measurements, recorded as such in the JSON.
Its JSON is its own (device, backend, settings, shapes; tests/test_accelerator_bench.py reads it),
not the harness's rows.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

# JAX must not take 75% of the GPU up front: transformers runs in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402

import numpy as np  # noqa: E402

SHAPES = {  # Hugging Face config.json fields of the real models
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         rope_theta=100000.0, max_position_embeddings=8192),
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
}
TRAIN_ROWS = {"smollm2-135m": 8, "tinyllama-1.1b": 4, "tiny": 2}  # 7B training does not fit one GPU in fp32 Adam
# (device-name fragment, peak memory bandwidth GB/s, dense bf16 TFLOPs, dense tf32 TFLOPs): first match wins
DEVICES = (
    ("H200", 4800, 989, 494),
    ("H100 PCIe", 2000, 756, 378),
    ("H100", 3350, 989, 494),
    ("A100 80GB PCIe", 1935, 312, 156),
    ("A100-SXM4-80GB", 2039, 312, 156),
    ("A100", 1555, 312, 156),
)


def device_peaks(kind: str, dtype: str, bandwidth: float | None, tflops: float | None):
    """(bandwidth GB/s, peak TFLOPs) for a device name, overrides first; None where unknown."""
    for fragment, gbs, bf16, tf32 in DEVICES:
        if fragment.lower() in kind.lower():
            return bandwidth or gbs, tflops or (tf32 if dtype == "float32" else bf16)
    return bandwidth, tflops


def model_config(shape: str, dtype: str):
    from cllm_jax.config import ModelConfig

    hf = {**SHAPES[shape], "model_type": "llama", "bos_token_id": 1, "eos_token_id": 2}
    return hf, ModelConfig.from_hf(hf, dtype=dtype, param_dtype=dtype)


def random_model(config, seed: int = 0):
    """A Llama with random weights made by a jitted initializer: they never exist on the host."""
    import jax
    from flax import nnx

    from cllm_jax.model.llama import Llama

    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(seed), stacked=True)))
    state = jax.jit(lambda: nnx.state(Llama(config, rngs=nnx.Rngs(seed), stacked=True)))()
    return nnx.merge(graphdef, state)


def weight_read_bytes(config) -> int:
    """Bytes of weights one decoding step reads: all but the embedding table when it is only looked
    up (untied head); a tied table is read whole by the logits."""
    from cllm_jax.model.llama import param_count

    lookup_only = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return (param_count(config) - lookup_only) * np.dtype(config.dtype).itemsize


def timed_generation(model, prompt, repeats: int, method: str, **options):
    """One prompt decoded under Decoder(model, method, **options), timed by the decoder: (the fastest of
    `repeats` timed runs, the first run, which compiled). Every run makes the same tokens and passes
    (greedy, no EOS)."""
    from cllm_jax.decode.engine import Decoder

    decoder = Decoder(model, method, **options)
    first = decoder.generate([prompt])[0]  # compiles
    return min((decoder.generate([prompt])[0] for _ in range(repeats)), key=lambda g: g.seconds), first


def time_ar(model, prompt, new_tokens: int, repeats: int) -> dict:
    best, first = timed_generation(model, prompt, repeats, "ar", max_new_tokens=new_tokens)
    tokens, seconds = len(best.token_ids), best.seconds
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "ms_per_token": 1e3 * seconds / tokens, "compile_s": first.compile_seconds}


def time_passes(model, prompt_len: int, cache_len: int, n: int, passes: int, repeats: int) -> dict:
    """ms per forward pass of n tokens at positions prompt_len.. against a cache of cache_len slots:
    a jitted fori_loop of passes, each fed the previous pass's argmax (as a Jacobi iteration is)."""
    import functools

    import jax
    import jax.numpy as jnp

    from cllm_jax.model.kv_cache import KVCache

    @functools.partial(jax.jit, donate_argnames=("cache",))
    def run(model, tokens, cache):
        positions = prompt_len + jnp.arange(n)[None, :]

        def body(_, carry):
            tokens, cache = carry
            hidden, cache = model(tokens, positions, cache)
            return jnp.argmax(model.logits(hidden), axis=-1).astype(jnp.int32), cache

        return jax.lax.fori_loop(0, passes, body, (tokens, cache))

    carry = [jnp.full((1, n), 5, jnp.int32), KVCache.zeros(model.config, 1, cache_len)]  # (tokens, cache)
    t0 = time.perf_counter()
    compiled = run.lower(model, *carry).compile()
    compile_s = time.perf_counter() - t0

    def loop():  # the cache is donated: each run takes the one the last returned
        carry[:] = jax.block_until_ready(compiled(model, *carry))

    best = harness.best_of(loop, repeats)["best"]  # the untimed first run pays one-off allocations
    return {"ms": 1e3 * best / passes, "compile_s": compile_s}


def time_train(config, rows: int, seq: int, remat: str, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from cllm_jax.model.llama import param_count
    from cllm_jax.train.config import OptimSection
    from cllm_jax.train.step import make_optimizer

    train_config = config.replace(param_dtype="float32")  # parameters and Adam moments stay fp32
    graphdef, params = nnx.split(random_model(train_config))
    tx, _ = make_optimizer(OptimSection(lr=1e-5), 100)
    opt_state = jax.jit(tx.init)(params)
    positions = jnp.broadcast_to(jnp.arange(seq), (rows, seq))

    def loss_fn(params, tokens):
        model = nnx.merge(graphdef, params)
        hidden, _ = model(tokens[:, :-1], positions, remat=remat)
        logits = model.logits(hidden)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    tokens = jax.random.randint(jax.random.key(0), (rows, seq + 1), 3, config.vocab_size)
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, tokens).compile()
    compile_s = time.perf_counter() - t0
    carry = [params, opt_state, None]  # (params, opt_state, loss); both states are donated

    def one_step():
        carry[:] = jax.block_until_ready(compiled(carry[0], carry[1], tokens))

    step_s = float(harness.best_of(one_step, steps)["median"])  # the untimed first step pays one-off allocations
    loss = carry[2]
    matmul_params = param_count(config) - config.vocab_size * config.hidden_size * (0 if config.tie_word_embeddings else 1)
    flops = 6 * matmul_params * rows * seq + 12 * config.num_layers * seq * seq * config.num_heads * config.head_dim * rows
    return {"rows": rows, "seq_len": seq, "remat": remat, "layer_loop": config.layer_loop, "step_s": step_s,
            "compile_s": compile_s, "tokens_per_s": rows * seq / step_s, "model_flops": flops,
            "loss": float(loss)}


def time_transformers(hf: dict, dtype: str, prompt, new_tokens: int, repeats: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = torch.float32 if device == "cpu" else getattr(torch, dtype)
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch_dtype)  # initialise in the target dtype, on the device (7B: no fp32 copy)
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**hf)).eval()
    finally:
        torch.set_default_dtype(default)
    model = model.to(torch_dtype)
    ids = torch.tensor([prompt], device=device)
    out = {"device": device, "dtype": str(torch_dtype).removeprefix("torch.")}
    for name, cache in (("dynamic", None), ("static", "static")):
        def run():
            with torch.no_grad():
                model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=0, cache_implementation=cache)
            if device == "cuda":
                torch.cuda.synchronize()

        best = harness.best_of(run, repeats)["best"]  # its untimed warm-up compiles the static-cache forward on CUDA
        out[name] = {"tokens_per_s": new_tokens / best, "ms_per_token": 1e3 * best / new_tokens}
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def time_decode(model, prompt, new_tokens: int, method: str, n: int, init: str, repeats: int) -> dict:
    best, _ = timed_generation(model, prompt, repeats, method, max_new_tokens=new_tokens, block_size=n,
                               init=init)  # fmt: skip
    return {"method": method, "init": init, "block_size": n, "forward_passes": best.forward_passes,
            "tokens": len(best.token_ids), "ms_per_pass": 1e3 * best.seconds / best.forward_passes}


def bench_shape(shape: str, args, clock) -> dict:
    import jax

    from cllm_jax.model.llama import param_count, resolve_layer_loop, unstack_layers

    hf, config = model_config(shape, args.dtype)
    auto = resolve_layer_loop("auto", config)
    kind = jax.devices()[0].device_kind
    bandwidth, tflops = device_peaks(kind, args.dtype, args.bandwidth, args.peak_tflops)
    prompt = np.random.default_rng(0).integers(3, config.vocab_size, args.prompt).tolist()
    kv_bytes = (2 * config.num_layers * config.num_kv_heads * config.head_dim * np.dtype(args.dtype).itemsize
                * (args.prompt + args.new_tokens / 2))
    row = {"params": param_count(config), "weight_bytes_per_token": weight_read_bytes(config),
           "kv_bytes_per_token": kv_bytes, "auto_layer_loop": auto, "ar": {}, "pass_ms": {}, "skipped": []}
    bytes_per_token = row["weight_bytes_per_token"] + kv_bytes
    row["roofline"] = {"bandwidth_gbs": bandwidth, "bytes_per_token": bytes_per_token,
                       "tokens_per_s": bandwidth * 1e9 / bytes_per_token if bandwidth else None}

    def optional(name, fn):
        if clock() > args.budget_s:
            row["skipped"].append(name)
            return None
        try:
            return fn()
        except ModuleNotFoundError as e:  # an accelerator image without torch/optax: measure the rest
            row["skipped"].append(f"{name} (no module {e.name})")
            return None

    if "transformers" not in args.skip:  # first, before JAX holds device memory
        row["transformers"] = optional("transformers", lambda: time_transformers(
            hf, args.dtype, prompt, args.new_tokens, args.repeats))
    loops = [auto] + [loop for loop in args.layer_loops if loop != auto]
    model = random_model(config.replace(layer_loop="scan"))
    for loop in sorted(loops, key=lambda x: x != "scan"):  # scan first: unstacking is one-way
        if loop == "per_layer":
            model = unstack_layers(model)
        is_auto = loop == auto
        result = optional(f"ar/{loop}", lambda: time_ar(model, prompt, args.new_tokens, args.repeats))
        if result:
            row["ar"][loop] = result
        sizes = args.block_sizes if is_auto else [1]
        row["pass_ms"][loop] = {}
        for n in sizes:
            result = optional(f"pass/{loop}/{n}", lambda: time_passes(
                model, args.prompt, args.cache, n, args.passes, args.repeats))
            if result:
                row["pass_ms"][loop][str(n)] = result["ms"]
        if is_auto:
            row["decode"] = {}
            for n in args.decode_sizes:
                result = optional(f"decode/{n}", lambda: time_decode(
                    model, prompt, args.new_tokens, "jacobi-rolling", n, "lookup", args.repeats))
                if result:
                    row["decode"][str(n)] = result
    del model
    ours = row["ar"].get(auto)
    if ours:
        for result in row.get("decode", {}).values():
            result["break_even_tpf"] = result["ms_per_pass"] / ours["ms_per_token"]
    if ours and row["roofline"]["tokens_per_s"]:
        row["roofline"]["share"] = ours["tokens_per_s"] / row["roofline"]["tokens_per_s"]
    passes = row["pass_ms"].get(auto, {})
    if "1" in passes:
        row["pass_ratio"] = {n: ms / passes["1"] for n, ms in passes.items()}
    if ours and row.get("transformers"):
        row["speedup_vs_static"] = ours["tokens_per_s"] / row["transformers"]["static"]["tokens_per_s"]
    if shape in TRAIN_ROWS and "train" not in args.skip:
        rows = args.train_rows or TRAIN_ROWS[shape]
        train = optional("train", lambda: time_train(config.replace(layer_loop=resolve_layer_loop(
            args.train_layer_loop, config, training=True)), rows, args.train_len, args.remat, args.train_steps))
        if train:
            train["mfu"] = train["model_flops"] / train["step_s"] / (tflops * 1e12) if tflops else None
            row["train"] = train
    return row


def print_shape(shape: str, row: dict) -> None:
    print(f"\n== {shape}: {row['params'] / 1e6:.1f}M parameters, default layer loop {row['auto_layer_loop']}")
    for loop, r in row["ar"].items():
        print(f"  our AR ({loop}): {r['tokens_per_s']:.1f} tok/s, {r['ms_per_token']:.2f} ms/token "
              f"(compile {r['compile_s']:.1f} s)")
    for name in ("dynamic", "static"):
        if row.get("transformers"):
            t = row["transformers"][name]
            print(f"  transformers generate, {name} cache: {t['tokens_per_s']:.1f} tok/s")
    for loop, passes in row["pass_ms"].items():
        print(f"  pass ms ({loop}): " + ", ".join(f"n={n}: {ms:.2f}" for n, ms in passes.items()))
    for n, d in row.get("decode", {}).items():
        print(f"  rolling Jacobi + lookup, n={n}: {d['ms_per_pass']:.2f} ms/pass"
              + (f", break-even TPF {d['break_even_tpf']:.2f}" if "break_even_tpf" in d else ""))
    roof = row["roofline"]
    if roof["tokens_per_s"]:
        share = f", reached {100 * roof['share']:.0f}%" if "share" in roof else ""
        print(f"  roofline: {roof['bytes_per_token'] / 1e9:.3f} GB/token at {roof['bandwidth_gbs']} GB/s = "
              f"{roof['tokens_per_s']:.0f} tok/s{share}")
    if "train" in row:
        t = row["train"]
        mfu = f", MFU {100 * t['mfu']:.1f}%" if t["mfu"] is not None else ""
        print(f"  train step ({t['rows']} x {t['seq_len']}, remat {t['remat']}, {t['layer_loop']}): "
              f"{t['step_s'] * 1e3:.1f} ms, {t['tokens_per_s']:.0f} tok/s{mfu}")
    if row["skipped"]:
        print(f"  skipped (time budget): {', '.join(row['skipped'])}")


def main(argv=None) -> dict:
    parser = harness.parser(__doc__, out="reports/accelerator.json")
    parser.set_defaults(repeats=2)  # best of this many runs after a warm-up
    parser.add_argument("--shapes", default="smollm2-135m,tinyllama-1.1b,llama2-7b",
                        help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on an accelerator, float32 on a CPU")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 64; tiny: 16)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 256; tiny: 32")
    parser.add_argument("--cache", type=int, default=None, help="KV slots of the pass timings (default 512; tiny 128)")
    parser.add_argument("--block-sizes", default="1,8,16,32,64")
    parser.add_argument("--decode-sizes", default="8,16", help="block sizes of the decoding-loop timings")
    parser.add_argument("--passes", type=int, default=None, help="passes per timed loop (default 16; tiny 4)")
    parser.add_argument("--layer-loops", default="scan,per_layer",
                        help="loops to time; the default (auto) loop gets every block size, the others n=1")
    parser.add_argument("--train-rows", type=int, default=None, help="default: 8 (135M), 4 (1.1B), 2 (tiny)")
    parser.add_argument("--train-len", type=int, default=None, help="packed row length (default 576; tiny 64)")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--train-layer-loop", default="auto")
    parser.add_argument("--remat", default="dots", choices=["none", "dots", "full"])
    parser.add_argument("--bandwidth", type=float, default=None, help="peak memory bandwidth, GB/s")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOPs of the dtype")
    parser.add_argument("--skip", default="", help="comma-separated: transformers, train")
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip optional work after this many seconds")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    import jax

    tiny = args.shapes == "tiny"
    accelerator = jax.default_backend() != "cpu"
    args.dtype = args.dtype or ("bfloat16" if accelerator else "float32")
    for name, full, small in (("prompt", 64, 16), ("new_tokens", 256, 32), ("cache", 512, 128), ("passes", 16, 4),
                              ("train_len", 576, 64)):
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)
    args.block_sizes = [int(n) for n in args.block_sizes.split(",")]
    args.decode_sizes = [int(n) for n in args.decode_sizes.split(",") if n]
    args.layer_loops = [x for x in args.layer_loops.split(",") if x]
    args.skip = set(filter(None, args.skip.split(",")))
    shapes = args.shapes.split(",")
    if unknown := [s for s in shapes if s not in SHAPES]:
        parser.error(f"unknown shape(s) {', '.join(unknown)}: choose from {', '.join(SHAPES)}")

    device = jax.devices()[0]
    report = {"device": device.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
              "host": platform.processor() or platform.machine(), "dtype": args.dtype,
              "settings": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
              "shapes": {}}
    print(f"{device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, {args.dtype}, batch 1, "
          f"prompt {args.prompt}, {args.new_tokens} new tokens", flush=True)
    for shape in shapes:
        report["shapes"][shape] = bench_shape(shape, args, lambda: time.perf_counter() - start)
        print_shape(shape, report["shapes"][shape])
    report["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{report['seconds']:.0f} s; wrote {out}")
    return report


if __name__ == "__main__":
    main()
