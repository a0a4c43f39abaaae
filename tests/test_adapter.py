"""Low-rank adapters: their function, their gradients, and the PEFT layout against `peft` itself.

- The adapted model equals the model whose weights have the adapter folded in (W + A B alpha / r),
  and gate 0 gives the base model exactly.
- Training only the adapter: its gradient equals the full model's gradient with respect to the
  merged weights, carried through W' = W + s A B (dL/dA = s G B^T, dL/dB = s A^T G), computed here
  directly from a full-model gradient of the merged model.
- The PEFT layout: peft loads our exported adapter onto the transformers model and gives our
  logits; we load an adapter peft wrote and give its logits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from cllm_jax.model import adapter as adapter_lib, llama
from cllm_jax.train.losses import ar_loss
from cllm_jax.weights.peft import load_adapter, save_adapter
from tests.tiny import port, torch_model

TOKENS = jnp.array([[5, 9, 11, 30, 7, 3, 21, 44, 17, 90]])
POSITIONS = jnp.arange(10)[None]


def random_adapter(model, rank=4, targets=adapter_lib.TARGETS, seed=1):
    adapter_lib.attach(model, adapter_lib.AdapterConfig(rank=rank, alpha=3.0 * rank, targets=targets))
    for i, target in enumerate(model.adapter.config.targets):
        b = getattr(model.adapter, f"{target}_lora_b")
        b[...] = 0.2 * jax.random.normal(jax.random.key(seed + i), b[...].shape)
    return model


def logits(model, gate=None):
    hidden, _ = model(TOKENS, POSITIONS, adapter_gate=gate)
    return np.asarray(model.logits(hidden))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_adapter_equals_merged_weights_and_gate_zero_is_the_base(kind):
    reference = torch_model(kind, num_key_value_heads=2)
    base, model = port(reference), random_adapter(port(reference))
    np.testing.assert_array_equal(logits(model, jnp.zeros(TOKENS.shape)), logits(base))
    merged = llama.merge_adapter(nnx.clone(model))
    assert merged.adapter is None
    np.testing.assert_allclose(logits(model), logits(merged), atol=2e-5)
    assert np.abs(logits(model) - logits(base)).max() > 1e-2


def test_adapter_gradient_is_the_full_gradient_through_the_low_rank_product():
    model = random_adapter(port(torch_model("llama", num_key_value_heads=2)), targets=("q", "v", "down"))
    scale = model.adapter.config.scale
    labels, weights = jnp.roll(TOKENS, -1, axis=1), jnp.ones(TOKENS.shape).at[:, -1].set(0.0)

    def loss(m):
        hidden, _ = m(TOKENS, POSITIONS)
        return ar_loss(m.logits(hidden), labels, weights)

    graphdef, lora, frozen = nnx.split(model, adapter_lib.LoRAParam, ...)
    adapter_grads = jax.grad(lambda p: loss(nnx.merge(graphdef, p, frozen)))(lora)

    merged = llama.merge_adapter(nnx.clone(model))
    merged_def, merged_params = nnx.split(merged)
    full_grads = jax.grad(lambda p: loss(nnx.merge(merged_def, p)))(merged_params)
    for target, (a, b) in model.adapter.stacked().items():
        g = full_grads["layers"][target][...]  # [layers, in, out]
        expected_a = scale * jnp.einsum("lio,lro->lir", g, b)
        expected_b = scale * jnp.einsum("lir,lio->lro", a, g)
        np.testing.assert_allclose(adapter_grads["adapter"][f"{target}_lora_a"][...], expected_a, rtol=2e-3, atol=1e-6)
        np.testing.assert_allclose(adapter_grads["adapter"][f"{target}_lora_b"][...], expected_b, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_peft_loads_our_adapter_with_our_logits(tmp_path, kind):
    from peft import PeftModel

    reference = torch_model(kind, num_key_value_heads=2)
    model = random_adapter(port(reference), targets=("q", "k", "v", "o", "up"))
    save_adapter(model, tmp_path, base_model="tiny")
    peft_model = PeftModel.from_pretrained(reference, tmp_path).eval()
    with torch.no_grad():
        theirs = peft_model(torch.tensor(np.asarray(TOKENS))).logits.numpy()
    np.testing.assert_allclose(logits(model), theirs, atol=2e-4)


def test_we_load_an_adapter_peft_wrote(tmp_path):
    from peft import LoraConfig, get_peft_model

    reference = torch_model("qwen2", num_key_value_heads=2)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], init_lora_weights=False)
    torch.manual_seed(3)
    peft_model = get_peft_model(torch_model("qwen2", num_key_value_heads=2), config).eval()
    peft_model.save_pretrained(tmp_path)
    with torch.no_grad():
        theirs = peft_model(torch.tensor(np.asarray(TOKENS))).logits.numpy()
    ours = load_adapter(port(reference), tmp_path)
    assert set(ours.adapter.config.targets) == {"q_proj", "v_proj", "gate_proj"}  # peft writes a set
    np.testing.assert_allclose(logits(ours), theirs, atol=2e-4)
