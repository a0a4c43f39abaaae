"""The train state and the jitted, sharded training step.

`train_step(graphdef, state, batch)` is pure: it runs every micro-batch of the [grad_accum, batch,
...] arrays through `lax.scan`, sums their gradients (each micro-batch loss is already divided by
the token counts of the whole global batch, so accumulation equals one large batch), then applies
one AdamW update. The packed layout projects to the vocabulary only the hidden states a loss weighs
(`ar_index`, `cons_student`, `cons_target`, padded to a few bucket sizes), not every position: at
SmolLM2's 49k vocabulary the projection is a large share of a step. With `ar_target="base"` the AR
term distils the frozen base model's next-token distributions (`base_params`, one more forward pass
without a backward) instead of the fixed point's tokens. `compile_train_step` wraps it
in `jax.jit` with explicit in/out shardings and the state donated, so parameters and optimizer
state are updated in place on their devices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cllm_jax.parallel import mesh as mesh_lib
from cllm_jax.train import drafter, losses
from cllm_jax.train.config import LossSection, OptimSection
from cllm_jax.train.packing import packed_attention_mask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    params: Any  # nnx.State of the model's parameters (float32)
    opt_state: Any  # optax state
    step: jax.Array  # int32 scalar: optimizer steps taken
    rng: jax.Array  # uint32 key data of the training RNG


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static (hashable) settings of the loss computation: the config's loss section, and what the batch
    layout, the model and the adapter decide."""

    loss: LossSection = LossSection()
    layout: str = "per_record"
    shared_target: bool = True
    remat: bool | str = True  # none | dots | full, True/False = full/none (cllm_jax.model.layers.rematerialize)
    gated: bool = False  # an adapter on the noisy blocks only (packed layout): see micro_loss
    dropout: bool = False  # the adapter has dropout: draw a key per micro-batch
    objective: str = "consistency"  # consistency (micro_loss) | placeholder (the placeholder drafter's, drafter.py)
    drafter_target: str = "tokens"  # the placeholder objective's target: tokens | base

    @property
    def terms(self) -> tuple[str, ...]:
        """The names of the loss terms a step reports beside the total."""
        return drafter.TERMS if self.objective == "placeholder" else ("loss_consistency", "loss_ar")


def make_optimizer(optim: OptimSection, total_steps: int):
    """(AdamW with clipping, its learning-rate schedule): linear warm-up, then cosine/linear/constant,
    as the config's optim section says (its defaults are the optimizer's).

    Warm-up lasts ceil(warmup_ratio * total_steps) steps, as in transformers. Norms and biases get no
    weight decay.
    """
    o = optim
    lr, schedule, min_lr_ratio, clip_norm = o.lr, o.schedule, o.min_lr_ratio, o.clip_norm
    total_steps = max(int(total_steps), 1)
    warmup = min(math.ceil(o.warmup_ratio * total_steps), total_steps - 1) if total_steps > 1 else 0
    end = lr * min_lr_ratio
    decay = [optax.constant_schedule(lr) if schedule == "constant"
             else optax.linear_schedule(lr, end, total_steps - warmup) if schedule == "linear"
             else optax.cosine_decay_schedule(lr, total_steps - warmup, alpha=min_lr_ratio)]
    sched = (optax.join_schedules([optax.linear_schedule(0.0, lr, warmup)] + decay, [warmup])
             if warmup else decay[0])

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not mesh_lib.param_name(path).endswith(("norm", "bias")), params)

    adamw = optax.adamw(sched, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), adamw) if clip_norm > 0 else adamw
    return tx, sched


def _gather(h: jax.Array, index: jax.Array) -> jax.Array:
    return jnp.take_along_axis(h, index[..., None], axis=1)


def _hidden(model, tokens, mesh, remat, positions=None, mask=None, gate=None, rng=None):
    batch, time = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(time, dtype=jnp.int32), (batch, time))
    hidden, _ = model(tokens, positions, mask=mask, remat=remat, adapter_gate=gate, adapter_rng=rng)
    return mesh_lib.constrain(hidden, mesh, ("batch", "length", "act_embed"))


def _base_logits(graphdef, base_params, micro: dict, options: StepOptions, mesh, mask):
    """The frozen base model's logits at the AR positions: the same rows, nothing to differentiate."""
    base = nnx.merge(graphdef, jax.lax.stop_gradient(base_params))
    if options.layout == "packed":
        return base.logits(_gather(_hidden(base, micro["tokens"], mesh, False, micro["positions"], mask),
                                   micro["ar_index"]))
    return base.logits(_hidden(base, micro["ar_tokens"], mesh, False))


def micro_loss(params, graphdef, micro: dict, denoms: tuple, *, options: StepOptions, mesh=None, base_params=None,
               frozen=None, rng=None):
    """(total loss, (consistency, ar)) of one micro-batch; both terms divided by global counts.

    `params` are what is trained: the whole model, or with an adapter only the adapter, the base
    weights coming in as `frozen`. A gated adapter acts on the noisy blocks alone, so the prompt and
    the clean blocks are the base model's own pass: the consistency target is the base model's
    distribution, and the adapter is what must reach it from noisy states. The adapter never runs on
    committed text when it drafts, so its AR term is taken where it does run: cross-entropy towards the
    base model's greedy token (the target's argmax) at the same slots as the consistency term.
    """
    cons_denom, ar_denom = denoms
    model = nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)
    mask = None
    if options.layout == "packed":
        mask = packed_attention_mask(micro["group"], micro["chain_limit"])
        gate = (micro["group"] > 0).astype(jnp.float32) if options.gated else None
        h = _hidden(model, micro["tokens"], mesh, options.remat, micro["positions"], mask, gate, rng)
        # only the positions a loss weighs reach the vocabulary projection (not students, not padding)
        ar_logits = model.logits(_gather(h, micro["ar_index"]))
        student_logits = model.logits(_gather(h, micro["cons_student"]))
        target_logits = model.logits(_gather(h, micro["cons_target"]))
    else:
        ar_h = _hidden(model, micro["ar_tokens"], mesh, options.remat, rng=rng)
        ar_logits = model.logits(ar_h)
        index = micro["cons_index"]
        student_h = _hidden(model, micro["student_tokens"], mesh, options.remat, rng=rng)
        student_logits = model.logits(_gather(student_h, index))
        if options.shared_target:
            target_logits = model.logits(_gather(ar_h, index))
        else:  # a forward pass of frozen weights: nothing to differentiate, nothing to remat
            frozen_model = nnx.merge(graphdef, *jax.lax.stop_gradient((params,) if frozen is None else (params, frozen)))
            target_logits = frozen_model.logits(_gather(_hidden(frozen_model, micro["target_tokens"], mesh, False),
                                                        index))
    ar_logits = mesh_lib.constrain(ar_logits, mesh, ("batch", "length", "act_vocab"))
    target_logits = jax.lax.stop_gradient(target_logits)
    cons = losses.consistency_loss(student_logits, target_logits, micro["cons_mask"], options.loss.distance,
                                   denom=cons_denom)
    if options.gated:
        greedy = jnp.argmax(target_logits, axis=-1)
        ar = losses.ar_loss(student_logits, greedy, micro["cons_mask"], options.loss.label_smoothing,
                            denom=cons_denom)
    elif options.loss.ar_target == "base":
        # Distillation, meant to keep the order of the base's near-ties where one-hot labels do not.
        base_logits = _base_logits(graphdef, base_params, micro, options, mesh, mask)
        ar = losses.consistency_loss(ar_logits, base_logits, micro["ar_weights"], "forward_kl", denom=ar_denom)
    else:
        ar = losses.ar_loss(ar_logits, micro["ar_labels"], micro["ar_weights"], options.loss.label_smoothing,
                            denom=ar_denom)
    return cons + options.loss.ar_weight * ar, (cons, ar)


def train_step(graphdef, state: TrainState, batch: dict, frozen=None, base_params=None, *, tx, schedule,
               options: StepOptions, mesh=None, grad_shardings=None) -> tuple[TrainState, dict]:
    """One optimizer step over a [grad_accum, batch, ...] batch. Pure; jit it with `compile_train_step`.

    frozen: the base weights when only an adapter trains (state.params is the adapter), else None.
    base_params: the base model's parameters when options.loss.ar_target == "base", else None."""
    if options.objective == "placeholder":
        denoms = drafter.denominators(batch)

        def loss(params, micro, rng):
            return drafter.micro_loss(params, graphdef, micro, denoms, options.drafter_target, options.remat, frozen,
                                      rng)
        counts = {"draft_weight": denoms[0]}
    else:
        # cons_mask sums to a whole number: 1 per token (tokens norm) or 1 per block (blocks norm, each
        # block's weights 1/count); rounding makes it exact whatever the summation order (sharding)
        denoms = (jnp.round(jnp.sum(batch["cons_mask"])), jnp.sum(batch["ar_weights"]))

        def loss(params, micro, rng):
            return micro_loss(params, graphdef, micro, denoms, options=options, mesh=mesh, base_params=base_params,
                              frozen=frozen, rng=rng)
        counts = {"consistency_tokens": denoms[0], "ar_tokens": denoms[1]}
    grad_fn = jax.value_and_grad(loss, has_aux=True)
    step_key = jax.random.wrap_key_data(state.rng)

    def accumulate(grads, xs):
        micro, index = xs
        rng = jax.random.fold_in(step_key, index) if options.dropout else None
        (total, terms), g = grad_fn(state.params, micro, rng)
        grads = jax.tree.map(jnp.add, grads, g)
        if grad_shardings is not None:
            grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        return grads, (total, terms)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    accum = jax.tree.leaves(batch)[0].shape[0]
    grads, (totals, terms) = jax.lax.scan(accumulate, zeros, (batch, jnp.arange(accum)))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
    metrics = {
        "loss": jnp.sum(totals),
        **{name: jnp.sum(term) for name, term in zip(options.terms, terms)},
        "grad_norm": optax.tree.norm(grads),
        "lr": schedule(state.step),
        **counts,
    }
    return TrainState(params, opt_state, state.step + 1, rng), metrics


def state_shardings(params_abstract, tx, mesh, rules=mesh_lib.DEFAULT_RULES) -> TrainState:
    """Shardings of every TrainState leaf: parameters by the rules, optimizer moments like their
    parameters, step and RNG replicated."""
    params_sh = mesh_lib.param_shardings(params_abstract, mesh, rules)
    replicated = mesh_lib.replicated(mesh)
    opt_abstract = jax.eval_shape(tx.init, params_abstract)
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, opt_abstract, params_sh,
                                   transform_non_params=lambda _: replicated,
                                   is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return TrainState(params_sh, opt_sh, replicated, replicated)


def abstract_state(params_abstract, tx, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs with shardings: the target of a checkpoint restore."""
    opt_abstract = jax.eval_shape(tx.init, params_abstract)
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    shapes = TrainState(params_abstract, opt_abstract, jax.ShapeDtypeStruct((), jnp.int32), rng)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def _place(value, sharding):
    value = jax.device_get(value) if isinstance(value, jax.Array) and jax.process_count() == 1 else value
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def place_params(params, shardings):
    """Host (or single-device) parameters as arrays on the mesh, sharded as `shardings`."""
    return jax.tree.map(_place, params, shardings)


def init_state(params, tx, shardings: TrainState, seed: int = 0) -> TrainState:
    """A fresh TrainState on the mesh from host (or single-device) parameters."""
    params = place_params(params, shardings.params)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), shardings.rng)
    return TrainState(params, opt_state, step, rng)


def compile_train_step(graphdef, tx, schedule, options: StepOptions, mesh, shardings: TrainState,
                       batch_ndims: dict[str, int], frozen_shardings=None):
    """jax.jit(train_step) with explicit in/out shardings and the state donated: (state, batch) ->
    (state, metrics), then `frozen` (the base weights under an adapter: frozen_shardings given) and
    `base_params` (options.loss.ar_target == "base") as further arguments where they are used."""
    fn = functools.partial(train_step, graphdef, tx=tx, schedule=schedule, options=options, mesh=mesh,
                           grad_shardings=shardings.params)
    batch_sh = {k: mesh_lib.batch_sharding(mesh, nd) for k, nd in batch_ndims.items()}
    extra = [frozen_shardings] if frozen_shardings is not None else []
    if options.loss.ar_target == "base":
        extra = [frozen_shardings, shardings.params]
    return jax.jit(fn, in_shardings=(shardings, batch_sh, *extra),
                   out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))
