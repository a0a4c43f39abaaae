"""The two layer loops (scan over stacked weights, per-layer) and the speed options against references.

Each variant is compared with something independent: transformers' torch model for logits and greedy
decoding, AR decoding for Jacobi's fixed point, the uninterrupted scan run for a checkpoint resumed
under the other loop, gradients without rematerialization for the remat policies.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from cllm_jax.config import ModelConfig
from cllm_jax.decode.engine import Decoder
from cllm_jax.errors import ConfigError
from cllm_jax.model.kv_cache import KVCache
from cllm_jax.model.llama import Llama, param_count, resolve_layer_loop, stack_layers, unstack_layers
from cllm_jax.weights.load import export_model, load_model
from tests.tiny import random_prompts, torch_greedy, torch_model

# (layer_loop, stacked storage): scan needs stacked weights; per_layer runs on either storage
# (stacked: training's canonical layout, sliced in the jitted function; per-layer arrays: decoding's).
LAYOUTS = {"scan": ("scan", True), "per_layer-stacked": ("per_layer", True), "per_layer": ("per_layer", None)}


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def our_logits(model, ids, cache_pieces=None):
    """Logits of one pass over ids, or of consecutive cached passes over the given (start, stop) pieces."""
    ids = jnp.asarray(ids)
    if cache_pieces is None:
        hidden, _ = model(ids, jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape))
        return np.asarray(model.logits(hidden))
    cache, out = KVCache.zeros(model.config, ids.shape[0], 64), []
    for start, stop in cache_pieces:
        positions = jnp.broadcast_to(jnp.arange(start, stop), (ids.shape[0], stop - start))
        hidden, cache = model(ids[:, start:stop], positions, cache)
        out.append(np.asarray(model.logits(hidden)))
    assert cache.per_layer == (model.config.layer_loop == "per_layer")
    return np.concatenate(out, axis=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    reference = torch_model("llama", num_key_value_heads=2, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("ckpt") / "hf"
    reference.save_pretrained(path)
    return reference, path


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_every_layer_loop_matches_transformers(layout, kind, tmp_path):
    loop, stacked = LAYOUTS[layout]
    reference = torch_model(kind, num_key_value_heads=2, initializer_range=0.02)
    reference.save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf", layer_loop=loop, stacked=stacked).model
    assert model.config.layer_loop == loop
    ids = np.array(random_prompts([40, 40], seed=3))
    expected = torch_logits(reference, ids)
    np.testing.assert_allclose(our_logits(model, ids), expected, atol=1e-4)
    pieces = [(0, 25), (25, 37), (37, 38), (38, 39), (39, 40)]  # prefill, a block, single tokens
    np.testing.assert_allclose(our_logits(model, ids, pieces), expected, atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layer_loop_decodes_like_transformers(layout, checkpoint):
    reference, path = checkpoint
    loop, stacked = LAYOUTS[layout]
    model = load_model(path, layer_loop=loop, stacked=stacked).model
    prompts = random_prompts([5, 11, 17])
    expected = [torch_greedy(reference, p, 24) for p in prompts]
    jacobi = {"block_size": 8}
    for method, extra in (("ar", {}), ("jacobi", jacobi), ("jacobi-rolling", jacobi),
                          ("jacobi-multiblock", jacobi | {"blocks": 2, "spawn_ratio": 0.5, "recycle": 2})):  # fmt: skip
        results = Decoder(model, method, max_new_tokens=24, batch_size=2, **extra)
        assert [r.token_ids for r in results.generate(prompts)] == expected, (layout, method)


def test_conversions_and_export_keep_the_weights(checkpoint, tmp_path):
    reference, path = checkpoint
    model = load_model(path, layer_loop="scan").model
    ids = np.array(random_prompts([30]))
    unstack_layers(model)
    assert model.config.layer_loop == "per_layer" and not hasattr(model.layers, "stacked")
    export_model(model, tmp_path / "from_per_layer")  # export from the per-layer storage
    np.testing.assert_allclose(our_logits(load_model(tmp_path / "from_per_layer", layer_loop="scan").model, ids),
                               torch_logits(reference, ids), atol=1e-4)
    stack_layers(model)
    np.testing.assert_allclose(our_logits(model, ids), torch_logits(reference, ids), atol=1e-4)


def test_gguf_loads_under_both_loops(smollm2):
    """The built-in GGUF model (through our GGUF reader) gives the same logits per-layer as scanned."""
    scan = smollm2.model
    assert smollm2.config.layer_loop == "scan"
    per_layer = load_model(None, layer_loop="per_layer").model
    ids = np.array(random_prompts([24], high=49152))
    np.testing.assert_allclose(our_logits(per_layer, ids), our_logits(scan, ids), atol=2e-4)


def test_auto_layer_loop_rule():
    small = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                        num_kv_heads=3, head_dim=64, tie_word_embeddings=True)
    large = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                        num_kv_heads=32, head_dim=128)
    assert 134e6 < param_count(small) < 136e6 and 6.7e9 < param_count(large) < 6.8e9
    # on a CPU: decoding reads each weight once per pass (per_layer), training compiles one layer (scan)
    assert resolve_layer_loop("auto", small, "cpu") == resolve_layer_loop("auto", large, "cpu") == "per_layer"
    assert resolve_layer_loop("auto", large, "cpu", training=True) == "scan"
    assert resolve_layer_loop("auto", small, "gpu") == "scan"
    assert resolve_layer_loop("auto", large, "gpu") == "per_layer"
    assert resolve_layer_loop("per_layer", small, "cpu") == "per_layer"
    with pytest.raises(ConfigError):
        resolve_layer_loop("unrolled", small)


def test_sharding_rules_cover_per_layer_storage():
    from cllm_jax.parallel import mesh as mesh_lib

    config = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16)
    mesh = mesh_lib.single_device_mesh()
    rules = mesh_lib.AxisRules()
    for stacked in (True, False):
        _, params = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), stacked=stacked)))
        specs = {jax.tree_util.keystr(p): s for p, s in
                 jax.tree_util.tree_flatten_with_path(mesh_lib.param_specs(params, mesh, rules))[0]}
        q = [s for k, s in specs.items() if "q_proj" in k]
        assert len(q) == (1 if stacked else 2)
        assert all(len(s) == (3 if stacked else 2) for s in q)


def test_remat_policies_and_attention_implementations_agree(checkpoint):
    """Gradients under every remat policy equal those without remat; jax.nn.dot_product_attention
    (the XLA implementation on a CPU) gives transformers' logits, under both loops."""
    reference, path = checkpoint
    ids = np.array(random_prompts([2 * 12], seed=4)).reshape(2, 12)
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    for loop in ("scan", "per_layer"):
        model = load_model(path, layer_loop=loop, stacked=True).model
        graphdef, params = nnx.split(model)

        def loss(params, remat):
            m = nnx.merge(graphdef, params)
            hidden, _ = m(jnp.asarray(ids), positions, remat=remat)
            return jnp.mean(jax.nn.logsumexp(m.logits(hidden), axis=-1))

        base = jax.grad(loss)(params, "none")
        for remat in ("dots", "full", True):
            grads = jax.jit(jax.grad(loss), static_argnums=1)(params, remat)
            for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(base)):
                np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
        model.config = model.config.replace(attention="dot_product")
        np.testing.assert_allclose(our_logits(model, ids), torch_logits(reference, ids), atol=1e-4)
        np.testing.assert_allclose(our_logits(model, ids, [(0, 9), (9, 10), (10, 12)]), torch_logits(reference, ids),
                                   atol=1e-4)


def test_both_loops_restore_the_same_checkpoint(tmp_path):
    """A run stopped under one loop resumes under the other and ends as the uninterrupted run."""
    from cllm_jax.checkpoint import Checkpointer
    from cllm_jax.train.config import load_config
    from cllm_jax.train.loop import run
    from cllm_jax.train.metrics_log import read_metrics
    from cllm_jax.weights.hf_dir import read_hf_dir
    from tests.test_checkpoint_resume import write_config, write_inputs

    inputs = write_inputs(tmp_path / "inputs")
    straight = run(load_config(write_config(tmp_path / "a.yaml", tmp_path / "a", *inputs,
                                            model={"layer_loop": "scan"})))

    class Stop(Exception):
        pass

    def stop_at_4(step):
        if step == 4:
            raise Stop

    config_b = write_config(tmp_path / "b.yaml", tmp_path / "b", *inputs, model={"layer_loop": "per_layer"})
    with pytest.raises(Stop):
        run(load_config(config_b), after_step=stop_at_4)
    assert Checkpointer(tmp_path / "b" / "checkpoints").all_steps() == [3]
    resumed = run(load_config(config_b, ["model.layer_loop=scan", "model.remat=dots"]))
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [m["step"] for m in b] == list(range(1, 9))
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in b], [m[key] for m in a], rtol=1e-4, err_msg=key)
    _, tensors_a = read_hf_dir(straight.export_dir)
    _, tensors_b = read_hf_dir(resumed.export_dir)
    for name in tensors_a:
        np.testing.assert_allclose(tensors_b[name], tensors_a[name], atol=1e-5, err_msg=name)


def test_half_dtype_weight_storage_keeps_the_logits_bit_identical(checkpoint):
    """Matrices stored in the compute dtype (what a bf16 decoding step reads): the same bf16 logits
    as fp32 storage cast at each use, under both loops; norms stay fp32."""
    _, path = checkpoint
    ids = np.array(random_prompts([16]))
    for loop in ("scan", "per_layer"):
        fp32 = load_model(path, dtype="bfloat16", layer_loop=loop).model
        half = load_model(path, dtype="bfloat16", layer_loop=loop, weights_dtype="bfloat16").model
        dtypes = {str(x.dtype) for x in jax.tree.leaves(nnx.state(half, nnx.Param)) if x.ndim >= 2}
        assert dtypes == {"bfloat16"}
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(half, nnx.Param)) if x.ndim == 1)
        np.testing.assert_array_equal(our_logits(half, ids), our_logits(fp32, ids))
