"""optax optimiser with the S5 paper's parameter groups, schedules and gradient accumulation.

Groups (as in the paper's reference training code; S4D's Λ and log Δ carry the same names, and
its C is in `decay` as in the state-spaces repository):
  ssm:      Λ (Lambda_re, Lambda_im), log Δ (log_step) and B — own learning rate, no weight decay;
  no_decay: norms, biases and D — base learning rate, no weight decay;
  decay:    everything else (C, dense kernels, embeddings) — base rate, AdamW weight decay.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

SSM_PARAMS = ("Lambda_re", "Lambda_im", "log_step", "B")
NO_DECAY_PARAMS = ("bias", "scale", "D", "mean", "var")


def param_group(name: str) -> str:
  if name in SSM_PARAMS:
    return "ssm"
  if name in NO_DECAY_PARAMS:
    return "no_decay"
  return "decay"


def param_groups(params):
  """Tree of group labels, a prefix of `params` (a label stands for a whole nn.Partitioned box)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: param_group(path[-1].key), params,
      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def make_schedule(peak: float, optim_config, num_steps: int) -> optax.Schedule:
  """Linear warmup, then cosine decay to min_lr_ratio·peak (or constant)."""
  warmup = min(optim_config.warmup_steps, max(num_steps - 1, 0))
  if optim_config.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)],
        [warmup])
  if optim_config.schedule != "cosine":
    raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {optim_config.schedule!r}")
  return optax.warmup_cosine_decay_schedule(
      0.0, peak, warmup, max(num_steps, warmup + 1), end_value=peak * optim_config.min_lr_ratio)


def make_optimizer(optim_config, num_steps: int, params) -> tuple[optax.GradientTransformation,
                                                                   optax.Schedule]:
  """Returns (optimizer, base learning-rate schedule for logging)."""
  base = make_schedule(optim_config.learning_rate, optim_config, num_steps)
  ssm = make_schedule(optim_config.ssm_learning_rate, optim_config, num_steps)
  adam = dict(b1=optim_config.b1, b2=optim_config.b2)
  groups = optax.multi_transform(
      {"ssm": optax.adam(ssm, **adam),
       "no_decay": optax.adam(base, **adam),
       "decay": optax.adamw(base, weight_decay=optim_config.weight_decay, **adam)},
      param_groups(params))
  chain = [optax.clip_by_global_norm(optim_config.clip_norm)] if optim_config.clip_norm else []
  return optax.chain(*chain, groups), base


def accumulated_value_and_grad(loss_fn, params, batch: dict, accum_steps: int):
  """Mean loss/aux and gradients over `accum_steps` micro-batches of `batch`, summed in a scan.

  One train step is still one global batch and one update, so step k's data and schedule do not
  depend on the accumulation setting; only peak activation memory does.

  loss_fn(params, micro_batch, micro_index) -> (loss, (aux, rows)): aux is averaged over the
  micro-batches; rows (leading dim: the micro-batch's rows, e.g. carried states) are put back
  together in the batch's row order.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    return grad_fn(params, batch, 0)
  micro = jax.tree.map(
      lambda x: x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:]), batch)

  def accumulate(totals, inputs):
    index, micro_batch = inputs
    (loss, (aux, rows)), grads = grad_fn(params, micro_batch, index)
    return jax.tree.map(jnp.add, totals, (loss, aux, grads)), rows

  shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), 0)
  (loss_shape, (aux_shape, _)), grads_shape = shapes
  zeros = jax.tree.map(jnp.zeros_like, (loss_shape, aux_shape, grads_shape))
  (loss, aux, grads), rows = jax.lax.scan(accumulate, zeros, (jnp.arange(accum_steps), micro))
  rows = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), rows)
  mean = lambda tree: jax.tree.map(lambda x: x / accum_steps, tree)
  return (mean(loss), (mean(aux), rows)), mean(grads)
