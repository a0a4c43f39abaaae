"""CLLM losses against direct numpy (and transformers LabelSmoother) computations on small examples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.trainer_pt_utils import LabelSmoother

from cllm_jax.config import ModelConfig
from cllm_jax.data.trajectories import TrajectoryRecord
from cllm_jax.model.llama import Llama
from cllm_jax.train import losses
from cllm_jax.train.batching import BatchSpec, DataSource
from cllm_jax.train.config import LossSection
from cllm_jax.train.spec import chosen_pairs
from cllm_jax.train.states import block_loss_mask, pick_states, state_pairs
from cllm_jax.train.step import StepOptions, micro_loss

TINY = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, eos_token_id=2)
# The reference's recipe (today's): reachable by config, and what the reference comparisons check.
TODAY = dict(ar_on_prompt=True, ar_after_eos=True, noise_schedule="uniform", context="clean",
             consistency_norm="tokens", student_eos_pads=True)


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def make_record(rng, data_id, prompt_len, n=6, n_states=4, k=0, prompt=None, labels=True):
    prompt = tuple(int(t) for t in rng.integers(3, 128, prompt_len)) if prompt is None else tuple(prompt)
    fixed = tuple(int(t) for t in rng.integers(3, 128, n))
    states = []
    for i in range(n_states - 1):  # state i has its first i+1 tokens right, the rest random
        s = [int(t) for t in rng.integers(3, 128, n)]
        s[: i + 1] = fixed[: i + 1]
        states.append(tuple(s))
    label_ids = prompt + tuple(int(t) for t in rng.integers(3, 128, 9)) if labels else None
    return TrajectoryRecord(
        data_id=data_id,
        jacobian_itr_id=k,
        prompt_ids_len=prompt_len,
        prompt_ids=prompt,
        answer_trajectory_ids=tuple(states) + (fixed,),
        teacher_output_ids=prompt + fixed,
        complete_teacher_output_ids=prompt + fixed,
        labels_ids=label_ids,
    )


# ---------------------------------------------------------------- distances and AR loss

@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    return rng.normal(size=(2, 5, 11)).astype(np.float32) * 3, rng.normal(size=(2, 5, 11)).astype(np.float32) * 3


@pytest.mark.parametrize("kind", losses.DISTANCES)
def test_distance_matches_numpy(logits, kind):
    student, target = logits
    log_q, log_p = np_log_softmax(student.astype(np.float64)), np_log_softmax(target.astype(np.float64))
    p, q = np.exp(log_p), np.exp(log_q)
    m = (p + q) / 2
    expected = {
        "forward_kl": -(p * log_q).sum(-1),
        "reverse_kl": (q * (log_q - log_p)).sum(-1),
        "js": 0.5 * (p * (log_p - np.log(m))).sum(-1) + 0.5 * (q * (log_q - np.log(m))).sum(-1),
    }[kind]
    got = losses.token_distance(jnp.asarray(student), jnp.asarray(target), kind)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", losses.DISTANCES)
def test_consistency_loss_masked_mean_and_no_target_gradient(logits, kind):
    student, target = map(jnp.asarray, logits)
    mask = jnp.asarray([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], jnp.float32)
    d = np.asarray(losses.token_distance(student, target, kind))
    expected = (d * np.asarray(mask)).sum() / 5
    np.testing.assert_allclose(float(losses.consistency_loss(student, target, mask, kind)), expected, rtol=1e-5)
    assert float(losses.consistency_loss(student, target, jnp.zeros_like(mask), kind)) == 0.0
    g_student, g_target = jax.grad(lambda s, t: losses.consistency_loss(s, t, mask, kind), argnums=(0, 1))(student, target)
    assert np.all(np.asarray(g_target) == 0.0)  # the target side gets no gradient
    assert np.all(np.asarray(g_student)[np.asarray(mask) == 0] == 0.0)  # nor do unmasked positions
    assert np.abs(np.asarray(g_student)).sum() > 0


def test_forward_kl_gradient_is_q_minus_p(logits):
    student, target = map(jnp.asarray, logits)
    mask = jnp.ones((2, 5))
    grad = jax.grad(lambda s: losses.consistency_loss(s, target, mask, "forward_kl"))(student)
    p, q = jax.nn.softmax(target), jax.nn.softmax(student)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(q - p) / 10, atol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_ar_loss_matches_transformers_label_smoother(eps):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 7, 13)).astype(np.float32) * 2
    tokens = rng.integers(0, 13, (2, 7))
    tokens[1, 5:] = -100  # padding
    expected = LabelSmoother(epsilon=eps)({"logits": torch.tensor(logits)}, torch.tensor(tokens), shift_labels=True)
    labels = np.concatenate([tokens[:, 1:], np.zeros((2, 1), int)], 1)
    weights = (labels != -100) & (np.arange(7) < 6)
    got = losses.ar_loss(jnp.asarray(logits), jnp.asarray(np.maximum(labels, 0)), jnp.asarray(weights, jnp.float32), eps)
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)


# ---------------------------------------------------------------- masks and state choice

def test_block_loss_mask_starts_at_first_mismatch():
    fixed = [10, 11, 12, 13, 14, 15]
    np.testing.assert_array_equal(block_loss_mask([10, 11, 12, 99, 14, 98], fixed), [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(block_loss_mask([10, 99, 12, 13, 14, 15], fixed), [0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(block_loss_mask(fixed, fixed), [0] * 6)
    # after EOS (2) a state is padding: ignored in the comparison and never predicted
    np.testing.assert_array_equal(block_loss_mask([10, 11, 2, 7, 7, 7], [10, 11, 2, 8, 9, 9], eos_id=2), [0] * 6)
    np.testing.assert_array_equal(block_loss_mask([10, 99, 2, 7, 7, 7], [10, 11, 12, 2, 9, 9], eos_id=2),
                                  [0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(block_loss_mask([10, 99, 12, 13, 14, 15], [10, 11, 2, 5, 5, 5], eos_id=2),
                                  [0, 1, 1, 1, 1, 1])


def test_state_choice_uniform_reproducible_and_never_the_fixed_point():
    record = make_record(np.random.default_rng(0), "a", 4, n_states=5)
    picks = [pick_states(record, np.random.default_rng(i))[0] for i in range(4000)]
    assert np.bincount(picks, minlength=5)[4] == 0
    np.testing.assert_allclose(np.bincount(picks, minlength=5)[:4] / 4000, 0.25, atol=0.03)
    for i in range(4):  # local: the target is the next state
        [(state, target)] = state_pairs(record, pick_states(record, np.random.default_rng(i)), "local")
        assert record.answer_trajectory_ids.index(target) == record.answer_trajectory_ids.index(state) + 1
    source = DataSource([record] * 3, BatchSpec.of(pad_multiple=8, **TODAY))
    a, b = source.batch(0, 0, (1, 3)), source.batch(0, 0, (1, 3))
    assert all(np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays)


# ---------------------------------------------------------------- the full loss of a batch

@jax.jit
def _forward_logits(model, ids):
    h, _ = model(ids, jnp.arange(ids.shape[1])[None])
    return model.logits(h)


def reference_record_loss(model, record, student, target, ar_ids, eps=0.1):
    """The reference trainer's computation for one record, in numpy from the model's logits.

    Returns (consistency entropy sum, count, LabelSmoother pieces) so a batch can be pooled.
    """
    def logits_of(ids):
        return np.asarray(_forward_logits(model, jnp.asarray([ids]))[0], np.float64)

    x_i, x_star = np.asarray(record.prompt_ids + student), np.asarray(record.prompt_ids + target)
    logits_i, logits_last = logits_of(x_i)[:-1], logits_of(x_star)[:-1]
    output_mask = np.zeros(len(x_i) - 1, bool)  # True = ignored, as in the reference
    mismatch = np.flatnonzero(x_i[1:] != x_star[1:])
    if len(mismatch) == 0:
        output_mask[:] = True
    else:
        output_mask[: mismatch[0]] = True
    entropy = -(np.exp(np_log_softmax(logits_last)) * np_log_softmax(logits_i)).sum(-1)
    cons_sum, cons_count = entropy[~output_mask].sum(), (~output_mask).sum()
    log_q = np_log_softmax(logits_of(ar_ids)[:-1])
    labels = np.asarray(ar_ids[1:])
    nll = -log_q[np.arange(len(labels)), labels]
    smooth = -log_q.mean(-1)
    return cons_sum, cons_count, ((1 - eps) * nll + eps * smooth).sum(), len(labels)


@pytest.mark.parametrize("consistency,ar_source", [("global", "teacher"), ("global", "labels"), ("local", "teacher")])
def test_batch_loss_matches_reference_computation(consistency, ar_source):
    rng = np.random.default_rng(2)
    records = [make_record(rng, i, plen) for i, plen in enumerate([5, 9, 3])]
    spec = BatchSpec.of(consistency=consistency, ar_source=ar_source, pad_multiple=8, seed=3, shuffle=False, **TODAY)
    hb = DataSource(records, spec).batch(0, 0, (1, 3))
    model = Llama(TINY, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    micro = {k: jnp.asarray(v[0]) for k, v in hb.arrays.items()}
    denoms = (jnp.sum(micro["cons_mask"]), jnp.sum(micro["ar_weights"]))
    options = StepOptions(loss=LossSection(consistency=consistency, label_smoothing=0.1),
                          shared_target=spec.shared_target, remat=False)
    total, (cons, ar) = jax.jit(lambda p: micro_loss(p, graphdef, micro, denoms, options=options))(params)

    sums = np.zeros(4)
    for i, record in enumerate(records):
        [(student, target)] = chosen_pairs(record, np.random.default_rng([3, 0, i, 0]), spec)
        ar_ids = record.teacher_output_ids if ar_source == "teacher" else record.labels_ids
        sums += reference_record_loss(model, record, student, target, ar_ids)
    np.testing.assert_allclose(float(cons), sums[0] / sums[1], rtol=2e-5)
    np.testing.assert_allclose(float(ar), sums[2] / sums[3], rtol=2e-5)
    np.testing.assert_allclose(float(total), sums[0] / sums[1] + 10 * sums[2] / sums[3], rtol=2e-5)


def test_shared_target_equals_separate_frozen_target():
    """Global + AR on the teacher output reuses the AR pass as target: same loss, same gradient."""
    rng = np.random.default_rng(4)
    records = [make_record(rng, i, plen) for i, plen in enumerate([4, 7])]
    graphdef, params = nnx.split(Llama(TINY, rngs=nnx.Rngs(1)))
    results = []
    for shared in (True, False):
        spec = BatchSpec.of(pad_multiple=8, shuffle=False)
        arrays = DataSource(records, spec).batch(0, 0, (1, 2)).arrays
        micro = {k: jnp.asarray(v[0]) for k, v in arrays.items()}
        if not shared:
            micro["target_tokens"] = micro["ar_tokens"]
        denoms = (jnp.sum(micro["cons_mask"]), jnp.sum(micro["ar_weights"]))
        fn = lambda p: micro_loss(p, graphdef, micro, denoms,  # noqa: E731
                                  options=StepOptions(shared_target=shared, remat=True))
        results.append(jax.jit(jax.value_and_grad(fn, has_aux=True))(params))
    (loss_a, _), grad_a = results[0]
    (loss_b, _), grad_b = results[1]
    np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grad_a), jax.tree.leaves(grad_b)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- the packed layout

def _loss_and_grad(records, spec, params, graphdef, options, shape):
    arrays = DataSource(records, spec).batch(0, 0, shape).arrays
    micro = {k: jnp.asarray(v[0]) for k, v in arrays.items()}
    denoms = (jnp.sum(micro["cons_mask"]), jnp.sum(micro["ar_weights"]))
    fn = lambda p: micro_loss(p, graphdef, micro, denoms, options=options)  # noqa: E731
    return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)


@pytest.mark.parametrize("consistency,ar_source,recipe", [
    ("global", "teacher", TODAY), ("global", "labels", TODAY), ("local", "teacher", TODAY),
    ("local", "labels", TODAY), ("global", "teacher", {}), ("global", "labels", {}),
    ("local", "teacher", {"context": "clean"})])
def test_packed_equals_per_record_for_single_blocks(consistency, ar_source, recipe):
    """One block per prompt: the packed row computes exactly the per-record losses and gradients."""
    rng = np.random.default_rng(5)
    records = [make_record(rng, i, plen) for i, plen in enumerate([4, 8, 6])]
    graphdef, params = nnx.split(Llama(TINY, rngs=nnx.Rngs(2)))
    out = {}
    for layout in ("per_record", "packed"):
        spec = BatchSpec.of(layout=layout, consistency=consistency, ar_source=ar_source, pad_multiple=16,
                         shuffle=False, **recipe)
        options = StepOptions(loss=LossSection(consistency=consistency), layout=layout,
                              shared_target=spec.shared_target)
        out[layout] = _loss_and_grad(records, spec, params, graphdef, options, (1, 3))
    (loss_a, terms_a), grad_a = out["per_record"]
    (loss_b, terms_b), grad_b = out["packed"]
    np.testing.assert_allclose(np.asarray(terms_a), np.asarray(terms_b), rtol=2e-5)
    for a, b in zip(jax.tree.leaves(grad_a), jax.tree.leaves(grad_b)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=2e-5)


def test_packed_prompt_of_several_blocks_matches_per_record_consistency():
    """Three blocks of one prompt in one packed row: same consistency loss as three per-record rows
    (two-state trajectories make the state choice deterministic)."""
    rng = np.random.default_rng(6)
    prompt, records = tuple(int(t) for t in rng.integers(3, 128, 5)), []
    for k in range(3):
        r = make_record(rng, "p", len(prompt), n_states=2, k=k, prompt=prompt, labels=False)
        records.append(TrajectoryRecord(
            data_id="p",
            jacobian_itr_id=k,
            prompt_ids_len=5,
            prompt_ids=prompt,
            answer_trajectory_ids=r.answer_trajectory_ids,
            teacher_output_ids=r.teacher_output_ids,
            complete_teacher_output_ids=r.teacher_output_ids,
        ))
        prompt = r.teacher_output_ids
    graphdef, params = nnx.split(Llama(TINY, rngs=nnx.Rngs(3)))
    per_record = _loss_and_grad(records, BatchSpec.of(pad_multiple=8, shuffle=False, **TODAY), params, graphdef,
                                StepOptions(), (1, 3))
    packed_spec = BatchSpec.of(layout="packed", pad_multiple=8, shuffle=False, **TODAY)
    assert len(DataSource(records, packed_spec)) == 1
    packed = _loss_and_grad(records, packed_spec, params, graphdef, StepOptions(layout="packed"), (1, 1))
    np.testing.assert_allclose(float(per_record[0][1][0]), float(packed[0][1][0]), rtol=2e-5)
    # the AR term of the pack is the cross-entropy of the whole greedy output, counted once
    assert float(packed[0][1][1]) > 0


def test_bfloat16_compute_keeps_float32_parameters_and_gradients():
    rng = np.random.default_rng(7)
    records = [make_record(rng, i, plen) for i, plen in enumerate([4, 6])]
    values = []
    for dtype in ("float32", "bfloat16"):
        graphdef, params = nnx.split(Llama(TINY.replace(dtype=dtype), rngs=nnx.Rngs(0)))
        (loss, _), grads = _loss_and_grad(records, BatchSpec.of(pad_multiple=8, shuffle=False), params, graphdef,
                                          StepOptions(), (1, 2))
        assert {x.dtype for x in jax.tree.leaves(params)} == {x.dtype for x in jax.tree.leaves(grads)} == {np.dtype("float32")}
        values.append(float(loss))
    np.testing.assert_allclose(values[1], values[0], rtol=1e-2)
