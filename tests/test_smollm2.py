"""The real SmolLM2-135M-Instruct: our port against transformers, Jacobi against AR, on GSM8K prompts."""

import jax.numpy as jnp
import numpy as np
import torch

from cllm_jax.decode.engine import Decoder


def test_per_token_kl_against_transformers(smollm2, smollm2_reference, gsm8k_chat_prompts):
    model = smollm2.model
    for ids in gsm8k_chat_prompts:
        positions = jnp.arange(len(ids))[None]
        hidden, _ = model(jnp.asarray([ids]), positions)
        ours = torch.log_softmax(torch.tensor(np.asarray(model.logits(hidden))[0], dtype=torch.float64), -1)
        with torch.no_grad():
            theirs = torch.log_softmax(smollm2_reference(torch.tensor([ids])).logits[0].double(), -1)
        kl = (theirs.exp() * (theirs - ours)).sum(-1)  # KL(reference || ours) per token
        assert kl.max().item() <= 1e-4, kl.max().item()


def test_greedy_continuation_equals_transformers_generate(smollm2, smollm2_reference, gsm8k_chat_prompts):
    eos = smollm2.tokenizer.eos_token_id
    decoder = Decoder(smollm2.model, **dict(method="ar", max_new_tokens=64, eos_id=eos))
    for ids, ours in zip(gsm8k_chat_prompts, decoder.generate(gsm8k_chat_prompts)):
        reference = smollm2_reference.generate(
            torch.tensor([ids]), max_new_tokens=64, do_sample=False, eos_token_id=eos, pad_token_id=eos
        )[0, len(ids) :].tolist()
        assert ours.token_ids == reference
        assert len(ours.token_ids) > 16  # a real answer, not an immediate EOS


def test_jacobi_on_smollm2_equals_ar(smollm2, gsm8k_chat_prompts):
    prompts = gsm8k_chat_prompts[:2]
    common = dict(max_new_tokens=48, eos_id=smollm2.tokenizer.eos_token_id, batch_size=2)
    ar = Decoder(smollm2.model, **dict(method="ar", **common)).generate(prompts)
    for method in ("jacobi", "jacobi-rolling"):
        jac = Decoder(smollm2.model, **dict(method=method, block_size=16, **common)).generate(prompts)
        assert [r.token_ids for r in jac] == [r.token_ids for r in ar], method
        assert all(r.forward_passes <= len(r.token_ids) + 3 * 16 for r in jac)
