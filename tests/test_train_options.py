"""The training options (docs/training.md) against hand-computed values and brute-force references.

Masks: the packed mask against one built token by token from the rule, and each noisy block's
logits in the packed row against a separate forward over exactly the context it should see. Losses:
the packed loss (noisy or clean context, several states per block, per-block normalisation, prompt-
and EOS-masked AR) against the same quantities computed from those separate forwards in numpy.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cllm_jax.data.trajectories import TrajectoryRecord
from cllm_jax.errors import ConfigError
from cllm_jax.train import losses, states
from cllm_jax.train.batching import BatchSpec, DataSource
from cllm_jax.train.config import LossSection, config_from_dict
from cllm_jax.train.packing import pack_records, pack_row, packed_attention_mask
from cllm_jax.train.spec import ar_weights, chosen_pairs, record_rng
from cllm_jax.train.step import StepOptions, micro_loss
from tests.test_losses import np_log_softmax
from tests.tiny import port, torch_model

EOS = 2


# ---------------------------------------------------------------- states, noise, schedules

def record_of(states_, k=0, prompt=(5, 6, 7)):
    fixed = states_[-1]
    full = tuple(prompt) + tuple(fixed)
    return TrajectoryRecord(
        data_id="p",
        jacobian_itr_id=k,
        prompt_ids_len=len(prompt),
        prompt_ids=tuple(prompt),
        answer_trajectory_ids=tuple(map(tuple, states_)),
        teacher_output_ids=full,
        complete_teacher_output_ids=full,
    )


FIXED = (10, 11, 12, 13)
# first mismatches 0, 1, 2, 2, 3 -> noise 1.0, 0.75, 0.5, 0.5, 0.25
HAND = [(9, 9, 9, 9), (10, 9, 9, 9), (10, 11, 9, 13), (10, 11, 8, 8), (10, 11, 12, 9), FIXED]


def test_noise_is_the_unconverged_share_and_stops_at_the_target_eos():
    assert [states.noise(s, FIXED) for s in HAND] == [1.0, 0.75, 0.5, 0.5, 0.25, 0.0]
    fixed = (10, EOS, 4, 4)  # after the target's EOS nothing counts
    assert states.noise((10, EOS, 9, 9), fixed, EOS) == 0.0
    assert states.noise((10, 7, 4, 4), fixed, EOS) == 0.75
    assert states.noise((10, 7, 4, 4), fixed, None) == 0.75


@pytest.mark.parametrize("schedule,k,count,expected", [
    ("progressive", 0, 1, [4]),      # targets [0, .5, 1]: block 0 -> 0 -> the 0.25 state
    ("progressive", 1, 1, [2]),      # 0.5: states 2 and 3 tie -> the earlier
    ("progressive", 2, 1, [0]),      # 1.0
    ("progressive", 3, 1, [4]),      # cyclic: block 3 -> target 0 again
    ("reverse", 0, 1, [0]),          # targets [1, .5, 0]
    ("reverse", 2, 1, [4]),
    ("progressive", 0, 2, [4, 2]),   # offsets 0 and 3 // 2 = 1: targets 0 and .5
    ("progressive", 1, 3, [2, 0, 4]),  # offsets 0, 1, 2 from index 1: .5, 1, 0
    ("progressive", 0, 7, [4, 2, 3, 1, 0, 5, 5]),  # targets 0,0,0,.5,.5: distinct picks, then the fixed point
])
def test_schedule_picks_on_a_hand_made_trajectory(schedule, k, count, expected):
    rec = record_of(HAND, k=k)
    assert states.pick_states(rec, np.random.default_rng(0), schedule, count=count, window=3) == expected


def test_each_epoch_shifts_the_sawtooth_by_one_block():
    for epoch in range(4):
        for k in range(3):
            assert (states.pick_states(record_of(HAND, k=k), None, "progressive", count=2, window=3, epoch=epoch)
                    == states.pick_states(record_of(HAND, k=k + epoch), None, "progressive", count=2, window=3))


def test_distinct_picks_take_the_next_nearest_state():
    # w=4: targets [0, 1/3, 2/3, 1], count 4 from block 0:
    # 0 -> .25 (4); 1/3 -> .25 taken, next nearest .5 (2, the earlier of a tie); 2/3 -> .75 (1); 1 -> 1.0 (0)
    assert states.pick_states(record_of(HAND), None, "progressive", count=4, window=4) == [4, 2, 1, 0]


def test_random_schedule_draws_the_progressive_targets_evenly():
    rec = record_of(HAND, k=0)
    picks = [states.pick_states(rec, np.random.default_rng(i), "random", count=1, window=3)[0] for i in range(600)]
    counts = np.bincount(picks, minlength=6)
    assert set(np.flatnonzero(counts)) == {0, 2, 4}  # the states nearest 1, .5 and 0
    np.testing.assert_allclose(counts[[0, 2, 4]] / 600, 1 / 3, atol=0.07)


def test_uniform_draws_distinct_states_and_only_the_fixed_point_fills():
    rec = record_of(HAND)
    for i in range(50):
        picks = states.pick_states(rec, np.random.default_rng(i), "uniform", count=3)
        assert len(set(picks)) == 3 and 5 not in picks
    assert states.pick_states(record_of([FIXED]), np.random.default_rng(0), "progressive", count=2) == [0, 0]


# ---------------------------------------------------------------- which predictions count

def test_slot_weights_by_hand():
    t = (10, 11, 12, 13)
    w = lambda s, norm, pads=False, target=t: list(states.slot_weights(s, target, EOS, norm, pads))  # noqa: E731
    # slots 0..n: j < n predicts block token j, slot n the token after the block
    assert w((10, 11, 9, 9), "tokens") == [0, 0, 1, 1, 0]
    assert w((10, 11, 9, 9), "blocks") == [0, 0, 0, 0.5, 0.5]  # from first mismatch + 1, to the next token
    assert w(t, "blocks") == [0] * 5
    # a spurious EOS in the student is just a wrong token; the reference drops the rest of the block
    assert w((10, EOS, 12, 9), "tokens") == [0, 1, 1, 1, 0]
    assert w((10, EOS, 12, 9), "tokens", pads=True) == [0, 1, 0, 0, 0]
    # an EOS in the target ends the block there (its EOS prediction included)
    te = (10, 11, EOS, 5)
    assert w((10, 9, 9, 9), "tokens", target=te) == [0, 1, 1, 0, 0]
    assert w((10, 9, 9, 9), "blocks", target=te) == [0, 0, 1, 0, 0]
    assert w((10, 11, EOS, 9), "blocks", target=te) == [0] * 5
    # the reference mask (tokens + pads) is block_loss_mask, slot n empty
    s = (10, 99, EOS, 7)
    assert w(s, "tokens", pads=True, target=te) == list(states.block_loss_mask(s, te, EOS)) + [0]


def test_ar_weights_by_hand():
    seq = [5, EOS, 6, 7, 8, EOS, 9, 9]  # prompt of 3 (with its own EOS), generation 7 8 EOS 9 9
    spec = BatchSpec.of(eos_id=EOS)
    # position i predicts seq[i + 1]: targets 7 8 EOS count; the prompt and after the EOS do not
    assert list(ar_weights(seq, 3, 3, spec)) == [0, 0, 1, 1, 1, 0, 0, 0]
    on_prompt = spec.replace(ar_on_prompt=True)
    assert list(ar_weights(seq, 3, 3, on_prompt)) == [1, 1, 1, 1, 1, 0, 0, 0]
    today = spec.replace(ar_on_prompt=True, ar_after_eos=True)
    assert list(ar_weights(seq, 3, 3, today)) == [1] * 7 + [0]


def test_todays_recipe_is_reachable_and_bad_combinations_are_refused():
    today = config_from_dict({"data": {"noise_schedule": "uniform", "context": "clean"},
                              "loss": {"ar_on_prompt": True, "ar_after_eos": True, "consistency_norm": "tokens",
                                       "student_eos_pads": True, "label_smoothing": 0.1}})
    spec = BatchSpec.from_config(today, EOS)
    assert (spec.noise_schedule, spec.context, spec.consistency_norm, spec.ar_on_prompt) == ("uniform", "clean",
                                                                                             "tokens", True)
    with pytest.raises(ConfigError, match="noise_schedule"):
        config_from_dict({"data": {"noise_schedule": "linear"}})
    with pytest.raises(ConfigError, match="states_per_block"):
        BatchSpec.of(states_per_block=2)  # per_record holds one state


# ---------------------------------------------------------------- packed rows against brute force

def prompt_records(seed=0, blocks=3, n=4, eos_in_last=True, spurious=True):
    """One prompt (holding an EOS) and its contiguous blocks; 4 noisy states per block."""
    rng = np.random.default_rng(seed)
    prompt = (5, 6, EOS, 7, 8)
    prefix, out = prompt, []
    for k in range(blocks):
        fixed = [int(t) for t in rng.integers(3, 128, n)]
        if eos_in_last and k == blocks - 1:
            fixed[1] = EOS  # the generation ends in the last block; the tokens after it are junk
        states_ = []
        for first in (0, 0, 1, 2):
            s = [int(t) for t in rng.integers(3, 128, n)]
            s[:first] = fixed[:first]
            states_.append(tuple(s))
        if spurious and k == 0:
            states_[2] = (fixed[0], EOS) + states_[2][2:]  # a spurious EOS in a noisy state
        out.append(TrajectoryRecord(
            data_id="p",
            jacobian_itr_id=k,
            prompt_ids_len=len(prompt),
            prompt_ids=prefix,
            answer_trajectory_ids=tuple(states_) + (tuple(fixed),),
            teacher_output_ids=prefix + tuple(fixed),
            complete_teacher_output_ids=prefix + tuple(fixed),
        ))
        prefix = prefix + tuple(fixed)
    return out


def rule_mask(chain_len, first, blocks, n, streams, context):
    """The attention mask built token by token from the rule (layout: chain, then each stream's
    blocks in order, each block with its own group under clean context)."""
    kinds = [("chain", i) for i in range(chain_len)]
    kinds += [("noisy", s, k, o) for s in range(streams) for k in range(blocks) for o in range(n)]
    size = len(kinds)
    out = np.zeros((size, size), bool)
    for a, ka in enumerate(kinds):
        for b, kb in enumerate(kinds):
            if ka[0] == "chain":
                out[a, b] = kb[0] == "chain" and kb[1] <= ka[1]
                continue
            _, s, k, o = ka
            start = first + k * n
            if kb[0] == "chain":  # the prompt; under clean context also the clean blocks before
                out[a, b] = kb[1] < (first if context == "noisy" else start)
            elif context == "noisy":
                out[a, b] = kb[1] == s and (kb[2] < k or (kb[2] == k and kb[3] <= o))
            else:
                out[a, b] = kb[1:3] == (s, k) and kb[3] <= o
    return out


@pytest.mark.parametrize("context", ["noisy", "clean"])
def test_packed_mask_follows_the_rule(context):
    records = prompt_records()
    spec = BatchSpec.of(layout="packed", eos_id=EOS, states_per_block=2, context=context)
    [pack] = pack_records(records, spec)
    row = pack_row(pack, 0, 0, spec)
    got = np.asarray(packed_attention_mask(jnp.asarray(row["group"]), jnp.asarray(row["chain_limit"])))
    np.testing.assert_array_equal(got, rule_mask(len(pack.chain), pack.prefix_lens[0], 3, 4, 2, context))


@jax.jit
def _logits(model, ids):
    h, _ = model(ids[None], jnp.arange(ids.shape[0])[None])
    return model.logits(h)[0]


def brute_force_losses(model, records, spec, epoch=0, example=0):
    """(consistency, AR) of one pack from separate causal forwards over each block's own context."""
    logits = lambda ids: np.asarray(_logits(model, jnp.asarray(ids)), np.float64)  # noqa: E731
    prompt_len, n = records[0].prompt_ids_len, records[0].block_size
    chain = list(records[-1].teacher_output_ids)
    clean = logits(chain)
    pairs = [chosen_pairs(r, record_rng(spec.seed, epoch, example, k), spec, epoch) for k, r in enumerate(records)]
    block_means, token_sums, token_count = [], 0.0, 0
    for s in range(spec.states_per_block):
        for k, r in enumerate(records):
            start = len(r.prompt_ids)
            student, target = pairs[k][s]
            if spec.context == "noisy":
                context = list(records[0].prompt_ids) + [t for j in range(k + 1) for t in pairs[j][s][0]]
            else:
                context = list(r.prompt_ids) + list(student)
            q = np_log_softmax(logits(context)[start - 1: start + n])  # slots 0..n
            p = np.exp(np_log_softmax(clean[start - 1: start + n]))
            ce = -(p * q).sum(-1)
            # the rule, written out: only the target's EOS ends the block
            end = list(target).index(EOS) + 1 if EOS in target else n
            diff = [j for j in range(end) if student[j] != target[j]]
            if not diff:
                continue
            if spec.consistency_norm == "blocks":
                kept = range(diff[0] + 1, (end - 1 if end < n else n) + 1)
                if len(kept):
                    block_means.append(ce[list(kept)].mean())
            else:
                kept = range(diff[0], end)
                token_sums += ce[list(kept)].sum()
                token_count += len(kept)
    cons = np.mean(block_means) if spec.consistency_norm == "blocks" else token_sums / token_count
    log_q = np_log_softmax(clean[:-1])
    eos_at = prompt_len + chain[prompt_len:].index(EOS)
    targets = range(prompt_len, eos_at + 1)  # the generation up to its EOS, the prompt left out
    ar = -np.mean([log_q[t - 1, chain[t]] for t in targets])
    return cons, ar


def loss_terms(model, records, spec, options=StepOptions(layout="packed", remat=False), rows=1, base=None):
    """(micro-batch, consistency, AR, total) of the first `rows` rows; `base`: the model an
    ar_target=base step distils."""
    hb = DataSource(records, spec).batch(0, 0, (1, rows))
    micro = {k: jnp.asarray(v[0]) for k, v in hb.arrays.items()}
    denoms = (jnp.sum(micro["cons_mask"]), jnp.sum(micro["ar_weights"]))
    graphdef, params = nnx.split(model)
    base_params = None if base is None else nnx.state(base)
    total, (cons, ar) = jax.jit(lambda p, b: micro_loss(p, graphdef, micro, denoms, options=options, base_params=b))(
        params, base_params)
    return micro, float(cons), float(ar), float(total)


@pytest.mark.parametrize("context,norm,schedule,count", [
    ("noisy", "blocks", "progressive", 1), ("noisy", "blocks", "progressive", 3), ("noisy", "tokens", "uniform", 2),
    ("clean", "blocks", "reverse", 2), ("clean", "tokens", "random", 1)])
def test_packed_loss_equals_separate_forwards(context, norm, schedule, count):
    model = port(torch_model("llama", num_key_value_heads=2))  # sharp logits: contexts matter
    records = prompt_records()
    spec = BatchSpec.of(layout="packed", eos_id=EOS, pad_multiple=8, shuffle=False, context=context,
                     consistency_norm=norm, noise_schedule=schedule, states_per_block=count, noise_window=4)
    micro, cons, ar, total = loss_terms(model, records, spec)
    ref_cons, ref_ar = brute_force_losses(model, records, spec)
    np.testing.assert_allclose(cons, ref_cons, rtol=2e-5)
    np.testing.assert_allclose(ar, ref_ar, rtol=2e-5)
    np.testing.assert_allclose(total, ref_cons + 10 * ref_ar, rtol=2e-5)
    # another state of a block costs n tokens: the chain is shared
    assert int((micro["group"] >= 0).sum()) == len(records[-1].teacher_output_ids) + count * 3 * 4


def test_distilled_ar_term_equals_separate_forwards_of_both_models():
    """ar_target=base: the AR term is -sum p_base log q over the generation up to its EOS, with p_base
    from a separate forward of another (frozen) model over the clean chain."""
    student = port(torch_model("llama", num_key_value_heads=2))
    base = port(torch_model("llama", seed=4, num_key_value_heads=2))
    records = prompt_records()
    spec = BatchSpec.of(layout="packed", eos_id=EOS, pad_multiple=8, shuffle=False, states_per_block=2)
    _, cons, ar, _ = loss_terms(student, records, spec, StepOptions(loss=LossSection(ar_target="base"), layout="packed", remat=False),
                                  base=base)

    chain, prompt_len = list(records[-1].teacher_output_ids), records[0].prompt_ids_len
    log_q = np_log_softmax(np.asarray(_logits(student, jnp.asarray(chain)), np.float64))
    p = np.exp(np_log_softmax(np.asarray(_logits(base, jnp.asarray(chain)), np.float64)))
    eos_at = prompt_len + chain[prompt_len:].index(EOS)
    soft_ce = [-(p[t - 1] * log_q[t - 1]).sum() for t in range(prompt_len, eos_at + 1)]
    np.testing.assert_allclose(ar, np.mean(soft_ce), rtol=2e-5)
    # the consistency term does not depend on the AR target
    np.testing.assert_allclose(cons, loss_terms(student, records, spec)[1], rtol=1e-6)


def test_distilled_ar_term_on_per_record_rows():
    student = port(torch_model("llama", num_key_value_heads=2))
    base = port(torch_model("llama", seed=4, num_key_value_heads=2))
    micro, _, ar, _ = loss_terms(student, prompt_records(), BatchSpec.of(eos_id=EOS, shuffle=False, pad_multiple=8),
                                   StepOptions(loss=LossSection(ar_target="base"), remat=False), rows=2, base=base)
    total, count = 0.0, 0.0
    for tokens, weights in zip(np.asarray(micro["ar_tokens"]), np.asarray(micro["ar_weights"])):
        log_q = np_log_softmax(np.asarray(_logits(student, jnp.asarray(tokens)), np.float64))
        p = np.exp(np_log_softmax(np.asarray(_logits(base, jnp.asarray(tokens)), np.float64)))
        total += float((-(p * log_q).sum(-1) * weights).sum())
        count += float(weights.sum())
    assert count > 0
    np.testing.assert_allclose(ar, total / count, rtol=2e-5)


def test_sparse_vocabulary_projection_equals_the_dense_one():
    """The packed step projects only weighted positions; projecting every position of the row and
    weighting with scattered dense arrays (the old computation) gives the same loss and gradient."""
    model = port(torch_model("llama", seed=1, num_key_value_heads=2))
    spec = BatchSpec.of(layout="packed", eos_id=EOS, pad_multiple=8, shuffle=False, states_per_block=2)
    hb = DataSource(prompt_records(seed=3), spec).batch(0, 0, (1, 1))
    micro = {k: jnp.asarray(v[0]) for k, v in hb.arrays.items()}
    assert micro["ar_index"].shape[-1] < micro["tokens"].shape[-1]
    denoms = (jnp.sum(micro["cons_mask"]), jnp.sum(micro["ar_weights"]))
    graphdef, params = nnx.split(model)
    options = StepOptions(layout="packed", remat=False)

    def dense(p):
        m = nnx.merge(graphdef, p)
        mask = packed_attention_mask(micro["group"], micro["chain_limit"])
        h, _ = m(micro["tokens"], micro["positions"], mask=mask)
        full = m.logits(h)  # every position, students and padding included
        t = full.shape[1]
        rows = jnp.arange(full.shape[0])[:, None]
        labels = jnp.zeros((1, t), jnp.int32).at[rows, micro["ar_index"]].add(micro["ar_labels"])
        weights = jnp.zeros((1, t)).at[rows, micro["ar_index"]].add(micro["ar_weights"])
        take = lambda i: jnp.take_along_axis(full, i[..., None], axis=1)  # noqa: E731
        cons = losses.consistency_loss(take(micro["cons_student"]), take(micro["cons_target"]),
                                       micro["cons_mask"], denom=denoms[0])
        return cons + 10 * losses.ar_loss(full, labels, weights, 0.0, denom=denoms[1])

    sparse_value, sparse_grad = jax.jit(jax.value_and_grad(
        lambda p: micro_loss(p, graphdef, micro, denoms, options=options)[0]))(params)
    dense_value, dense_grad = jax.jit(jax.value_and_grad(dense))(params)
    np.testing.assert_allclose(float(sparse_value), float(dense_value), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(sparse_grad), jax.tree.leaves(dense_grad)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)


def test_noisy_context_pack_ends_at_a_missing_block():
    records = prompt_records(blocks=4, eos_in_last=False)
    gap = [records[0], records[1], records[3]]
    noisy = BatchSpec.of(layout="packed", eos_id=EOS, context="noisy")
    assert [len(p.records) for p in pack_records(gap, noisy)] == [2, 1]
    clean = BatchSpec.of(layout="packed", eos_id=EOS, context="clean")
    assert [len(p.records) for p in pack_records(gap, clean)] == [3]


def test_several_states_per_block_fit_max_seq_len():
    records = prompt_records(blocks=3, eos_in_last=False)
    chain = len(records[-1].teacher_output_ids)  # 5 + 12
    spec = BatchSpec.of(layout="packed", eos_id=EOS, states_per_block=3, max_seq_len=chain + 2 * 3 * 4)
    packs = pack_records(records, spec)  # 3 states x 3 blocks x 4 tokens do not fit with the chain
    assert len(packs) == 2
    assert all(len(pack_row(p, 0, i, spec)["tokens"]) <= spec.max_seq_len for i, p in enumerate(packs))


def test_per_record_rows_weigh_only_their_own_block():
    """A per-record row of block 2 (prefix = prompt + blocks 0, 1): AR on this block's tokens up to
    the EOS, consistency slots from the first mismatch + 1 to the EOS."""
    records = prompt_records()
    row = DataSource(records, BatchSpec.of(eos_id=EOS, shuffle=False)).row(0, 2)
    start = len(records[2].prompt_ids)  # 5 + 8
    expected = np.zeros(start + 4)
    expected[start - 1: start + 1] = 1  # predicting the block's token 0 and its EOS (token 1)
    np.testing.assert_array_equal(row["ar_weights"], expected)
    [(student, target)] = chosen_pairs(records[2], record_rng(0, 0, 2), BatchSpec.of(eos_id=EOS))
    p = next(j for j in range(4) if student[j] != target[j])
    np.testing.assert_array_equal(row["cons_mask"], [0, 1, 0, 0, 0] if p == 0 else [0] * 5)
    np.testing.assert_array_equal(row["cons_index"], np.arange(5) + start - 1)
