"""Training the placeholder drafter: its many-anchor layout equals separate plain forward passes, and a
trained drafter drafts what the base model then accepts (measured by decoding, not by the loss).

References: one causal forward pass of the gated model over [text up to the anchor, placeholders] per
anchor (no custom mask), transformers' greedy generate for the decoded text, and peft loading the
exported LoRA part onto the transformers model.
"""


import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cllm_jax.data.collect import CollectOptions, records_for
from cllm_jax.decode.engine import Decoder, summarize
from cllm_jax.evaluate.draft_acceptance import draft_acceptance
from cllm_jax.model import adapter as adapter_lib
from cllm_jax.train.config import config_from_dict
from cllm_jax.train.drafter import DrafterSpec, drafter_row, forward
from cllm_jax.train.loop import run
from cllm_jax.weights.peft import load_adapter
from tests.test_placeholder import with_random_drafter
from tests.tiny import port, random_prompts, torch_greedy, torch_model

K = 4


def test_many_anchors_in_one_row_equal_one_plain_forward_per_anchor():
    model = with_random_drafter(port(torch_model("llama", num_key_value_heads=2)), placeholders=K)
    vocab = model.config.vocab_size
    text = random_prompts([40], seed=3)[0]
    spec = DrafterSpec(placeholders=K, anchors=5, decay=0.8, target="tokens", max_seq_len=64, pad_multiple=16,
                       seed=0, shuffle=False)
    row = drafter_row(text, 12, np.random.default_rng(0), spec)
    micro = {k: jnp.asarray(v)[None] for k, v in row.items()}
    text_hidden, draft_hidden = forward(model, micro)
    drafts = np.asarray(model.logits(draft_hidden[0]))
    for group, anchor in enumerate(np.unique(row["anchor"])):
        plain_tokens = jnp.asarray([text[: anchor + 1] + [vocab + j for j in range(K)]])
        plain_gate = (plain_tokens >= vocab).astype(jnp.float32)
        plain, _ = model(plain_tokens, jnp.arange(plain_tokens.shape[1])[None], adapter_gate=plain_gate)
        np.testing.assert_allclose(drafts[group * K:(group + 1) * K], np.asarray(model.logits(plain[0, -K:])),
                                   atol=2e-4)
    labels_at = row["anchor"] + 2 + row["draft_index"]
    inside = labels_at < len(text)
    assert (row["labels"][inside] == np.asarray(text)[labels_at[inside]]).all()
    # The text's own hidden states are the base model's: the gate is off on every text token.
    base = port(torch_model("llama", num_key_value_heads=2))
    plain_text, _ = base(jnp.asarray([text]), jnp.arange(len(text))[None])
    np.testing.assert_allclose(np.asarray(text_hidden[0]), np.asarray(plain_text[0]), atol=1e-5)


def _ar_records(model, prompts, budget):
    options = CollectOptions(max_new_tokens=budget, clean=False, method="ar", batch_size=len(prompts))
    generations = options.decoder(model).generate(prompts)
    return [r for i, (p, g) in enumerate(zip(prompts, generations))
            for r in records_for(i, p, g, None, options, None, None)[0]], generations


def _placeholder_tpf(model, prompts, budget):
    out = Decoder(model, "lossless-placeholder", batch_size=4, drafts=K, lookup=0, init="prefix-sample",
                  max_new_tokens=budget).generate(prompts)
    return out, summarize(out)["tokens_per_forward"]


@pytest.mark.parametrize("target", ["tokens", "base"])
def test_a_trained_drafter_drafts_what_the_base_accepts(tmp_path, target):
    reference = torch_model("llama", num_key_value_heads=2)
    prompts = random_prompts([8] * 8, seed=4)
    budget = 32
    records, generations = _ar_records(port(reference), prompts, budget)
    assert [g.token_ids for g in generations] == [torch_greedy(reference, p, budget) for p in prompts]
    config = config_from_dict({
        "run_dir": str(tmp_path / "run"),
        "adapter": {"rank": 8, "alpha": 16},
        "drafter": {"placeholders": K, "anchors": 16, "target": target},
        "data": {"max_seq_len": 64, "pad_multiple": 16},
        "optim": {"lr": 3e-3, "max_steps": 150, "batch_size": 4},
        "checkpoint": {"every": 10_000, "asynchronous": False},
        "log": {"progress": False},
    })  # fmt: skip
    untrained = adapter_lib.attach(port(reference), config.adapter_config())
    _, before = _placeholder_tpf(untrained, prompts, budget)
    result = run(config, model=port(reference), records=records)
    trained = load_adapter(port(reference), result.export_dir)
    assert trained.adapter.placeholders.shape == (K, trained.config.hidden_size)
    out, after = _placeholder_tpf(trained, prompts, budget)
    assert [r.token_ids for r in out] == [g.token_ids for g in generations]  # lossless, trained or not
    assert after > before + (0.5 if target == "tokens" else 0.2), (before, after)
    if target == "tokens":  # (the base target is a soft cross-entropy: it keeps the teacher's entropy)
        assert result.last_metrics["loss_first_draft"] < 3.0
        _offline_acceptance_matches_plain_forwards_and_decoding(trained, prompts, generations, after)


def _offline_acceptance_matches_plain_forwards_and_decoding(model, prompts, generations, decoded_tpf):
    """draft_acceptance counts, at every anchor, the drafts of one plain forward over [text up to the
    anchor, placeholders]; its replay of decoding's passes gives the drafter-alone TPF decoding measured."""
    vocab = model.config.vocab_size
    sequences = [(p + g.token_ids, len(p)) for p, g in zip(prompts, generations)]
    figures = draft_acceptance(model, sequences, drafts=K)
    hits, anchors = np.zeros(K), 0
    for text, prompt_length in sequences[:2]:
        for anchor in range(prompt_length - 1, len(text) - 1 - K):  # every anchor whose K labels exist
            tokens = jnp.asarray([text[: anchor + 1] + [vocab + j for j in range(K)]])
            hidden, _ = model(tokens, jnp.arange(tokens.shape[1])[None], adapter_gate=(tokens >= vocab))
            drafts = np.argmax(np.asarray(model.logits(hidden[0, -K:])), axis=-1)
            hits += np.cumprod(drafts == np.asarray(text[anchor + 2: anchor + 2 + K]))
            anchors += 1
    two = draft_acceptance(model, sequences[:2], drafts=K)
    assert two["anchors"] == anchors
    np.testing.assert_allclose(two["by_position"], hits / anchors)
    assert figures["by_position"][0] > 0.3  # a trained drafter: the check above counted real hits
    assert abs(figures["replayed_tpf"] - decoded_tpf) < 0.15, (figures, decoded_tpf)


def test_peft_loads_the_exported_lora_part_and_we_load_the_whole_drafter(tmp_path):
    from peft import PeftModel

    from cllm_jax.weights.peft import save_adapter

    reference = torch_model("llama", num_key_value_heads=2)
    model = with_random_drafter(port(reference), placeholders=K)
    save_adapter(model, tmp_path / "drafter", "tiny")
    loaded, other = load_adapter(port(reference), tmp_path / "drafter"), port(reference)  # (peft changes reference)
    np.testing.assert_array_equal(np.asarray(loaded.adapter.placeholders[...]), np.asarray(model.adapter.placeholders[...]))
    tokens = jnp.asarray([[5, 9, 11, 30, 7, 3]])
    ours, _ = loaded(tokens, jnp.arange(6)[None])  # no gate: the LoRA on every token, as peft applies it
    peft_model = PeftModel.from_pretrained(reference, str(tmp_path / "drafter")).eval()
    with torch.no_grad():
        theirs = peft_model(torch.tensor(np.asarray(tokens))).logits.numpy()
    np.testing.assert_allclose(np.asarray(loaded.logits(ours)), theirs, atol=2e-4)
    # bfloat16 storage (the shipped drafters): half the bytes, the same drafter to bf16 precision.
    save_adapter(model, tmp_path / "half", "tiny", dtype="bfloat16")
    half = load_adapter(other, tmp_path / "half")
    size = lambda d: sum(f.stat().st_size for f in d.iterdir() if f.suffix == ".safetensors")  # noqa: E731
    assert size(tmp_path / "half") < 0.6 * size(tmp_path / "drafter")
    np.testing.assert_allclose(np.asarray(half.adapter.placeholders[...]), np.asarray(model.adapter.placeholders[...]),
                               rtol=1e-2, atol=1e-3)



def test_placeholder_embeddings_that_are_not_finite_are_refused_at_load(tmp_path):
    from safetensors.numpy import load_file, save_file

    from cllm_jax.errors import CheckpointError
    from cllm_jax.weights.peft import PLACEHOLDERS_FILE, save_adapter

    reference = torch_model("llama", num_key_value_heads=2)
    save_adapter(with_random_drafter(port(reference), placeholders=K), tmp_path / "d", "tiny")
    embeddings = load_file(str(tmp_path / "d" / PLACEHOLDERS_FILE))["placeholders"]
    embeddings[1, 3] = np.nan
    save_file({"placeholders": embeddings}, str(tmp_path / "d" / PLACEHOLDERS_FILE))
    with pytest.raises(CheckpointError, match=f"{PLACEHOLDERS_FILE}: tensor placeholders holds NaN"):
        load_adapter(port(reference), tmp_path / "d")
