"""Loss, train step and eval step, shared by training, evaluation and sampling.

Every metric is accumulated as sums (negative log-likelihood, weights, bytes, correct) so that
micro-batches, padded eval batches and whole splits aggregate exactly.
"""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from s5scale import optim
from s5scale.nn.blocks import BATCH_NORM_MOMENTUM
from s5scale.nn.model import zero_states


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # completed updates
  params: Any
  opt_state: Any
  batch_stats: Any           # BatchNorm running statistics ({} without BatchNorm)
  rng: jax.Array             # base key: step k uses fold_in(rng, k)
  bad_steps: jax.Array       # consecutive non-finite updates (skipped)
  skipped_steps: jax.Array   # all skipped updates
  # data.carry_state: every layer's final SSM state of the last step, the next step's initial
  # state, held real (stored_states); {} without carried state.
  carried: Any = flax.struct.field(default_factory=dict)


def stored_states(states):
  """The model's (num_layers, batch, ...) complex states -> (batch, num_layers, ..., 2) float32.

  Batch first, so micro-batches and the batch sharding split them like the batch; real, so any
  checkpoint format holds them.
  """
  states = jnp.moveaxis(states, 0, 1)
  return jnp.stack([states.real, states.imag], axis=-1)


def model_states(stored):
  """stored_states' inverse: (batch, num_layers, ..., 2) -> (num_layers, batch, ...) complex."""
  return jnp.moveaxis(jax.lax.complex(stored[..., 0], stored[..., 1]), 1, 0)


def forward(model, params, batch_stats, batch: dict, *, train: bool, rng=None, states=None):
  """Model outputs and updated BatchNorm statistics.

  states: None, or the layers' initial states (the model's layout); the outputs are then
  (logits, final states).
  """
  variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
  kwargs = dict(reset=batch.get("reset"), mask=batch.get("mask"), train=train)
  if states is not None:
    kwargs["states"] = states
  rngs = {"dropout": rng} if rng is not None else {}
  if train and batch_stats:
    logits, updates = model.apply(variables, batch["inputs"], rngs=rngs, mutable=["batch_stats"],
                                  **kwargs)
    return logits, updates["batch_stats"]
  return model.apply(variables, batch["inputs"], rngs=rngs, **kwargs), batch_stats


def metric_sums(logits, batch: dict, task: str) -> dict:
  """Summed NLL (nats) and weights for a batch; padded rows/steps carry zero weight."""
  if task == "lm":
    weights = batch["mask"].astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
    byte_counts = batch.get("target_bytes", weights)
    return dict(nll_sum=jnp.sum(nll * weights), weight_sum=jnp.sum(weights),
                byte_sum=jnp.sum(byte_counts * weights), correct_sum=jnp.sum(correct * weights))
  weights = jnp.max(batch["mask"], axis=1).astype(jnp.float32)  # an all-padding row weighs 0
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  return dict(nll_sum=jnp.sum(nll * weights), weight_sum=jnp.sum(weights),
              byte_sum=jnp.sum(weights), correct_sum=jnp.sum(correct * weights))


def mean_loss(sums: dict):
  return sums["nll_sum"] / jnp.maximum(sums["weight_sum"], 1.0)


def make_train_step(model, task: str, optimizer, schedule, accum_steps: int):
  """(state, batch) -> (state, metrics); a non-finite loss or gradient skips the update."""

  def loss_fn(params, state, micro_batch, micro_index):
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), micro_index)
    carried = micro_batch.pop("carried", None)
    outputs, batch_stats = forward(
        model, params, state.batch_stats, micro_batch, train=True, rng=rng,
        states=None if carried is None else model_states(carried))
    if carried is None:
      logits, final = outputs, {}
    else:
      # Truncated backpropagation through time: the next step starts from these values, and no
      # gradient flows back into the step that produced them.
      logits, final = outputs[0], stored_states(jax.lax.stop_gradient(outputs[1]))
    sums = metric_sums(logits, micro_batch, task)
    return mean_loss(sums), ((sums, batch_stats), final)

  def train_step(state: TrainState, batch: dict):
    if jax.tree.leaves(state.carried):   # split into micro-batches with the rows they belong to
      batch = dict(batch, carried=state.carried)
    (loss, ((sums, batch_stats), final)), grads = optim.accumulated_value_and_grad(
        lambda p, b, i: loss_fn(p, state, dict(b), i), state.params, batch, accum_steps)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # An update that would make parameters non-finite is as bad as a non-finite gradient.
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & jnp.isfinite(optax.tree.norm(updates)))

    def if_finite(new, old):
      return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    new_state = state.replace(
        step=state.step + 1, params=if_finite(params, state.params),
        opt_state=if_finite(opt_state, state.opt_state),
        batch_stats=if_finite(batch_stats, state.batch_stats),
        bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
        skipped_steps=state.skipped_steps + jnp.where(finite, 0, 1),
        # The stream has moved on either way; a non-finite step's states would poison the next
        # windows, so those rows start again from zero, as at a new item.
        carried=jax.tree.map(zero_non_finite_rows, final))
    metrics = dict(loss=loss, grad_norm=grad_norm, learning_rate=schedule(state.step),
                   accuracy=sums["correct_sum"] / jnp.maximum(sums["weight_sum"], 1.0),
                   bad_steps=new_state.bad_steps, skipped_steps=new_state.skipped_steps)
    return new_state, metrics

  return train_step


def zero_non_finite_rows(stored):
  """(batch, ...) stored states with every row that holds a non-finite number set to zero."""
  finite = jnp.all(jnp.isfinite(stored), axis=tuple(range(1, stored.ndim)), keepdims=True)
  return jnp.where(finite, stored, 0)


def make_eval_step(model, task: str):
  """(params, batch_stats, batch) -> metric sums, with dropout off and BatchNorm frozen."""

  def eval_step(params, batch_stats, batch):
    logits, _ = forward(model, params, batch_stats, batch, train=False)
    return metric_sums(logits, batch, task)

  return eval_step


def make_carried_eval_step(model, task: str):
  """(params, batch_stats, batch, stored states) -> (metric sums, the states after the batch):
  eval_step with every layer's state carried in from the previous window of each row."""

  def carried_eval_step(params, batch_stats, batch, stored):
    (logits, final), _ = forward(model, params, batch_stats, batch, train=False,
                                 states=model_states(stored))
    return metric_sums(logits, batch, task), stored_states(final)

  return carried_eval_step


def init_train_state(model, optimizer, config, sample_batch: dict) -> TrainState:
  """Fresh state; call under jit with out_shardings so it is created already sharded."""
  rng = jax.random.PRNGKey(config.train.seed)
  variables = model.init({"params": jax.random.fold_in(rng, -1 % 2**31)},
                         sample_batch["inputs"], reset=sample_batch.get("reset"),
                         mask=sample_batch.get("mask"), train=False)
  params = variables["params"]
  carried = {}
  if config.data.get("carry_state"):
    carried = zero_carried_states(model, sample_batch["inputs"].shape[0])
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    batch_stats=variables.get("batch_stats", {}), rng=rng,
                    bad_steps=jnp.zeros((), jnp.int32), skipped_steps=jnp.zeros((), jnp.int32),
                    carried=carried)


def zero_carried_states(model, batch: int):
  """Zero stored states for `batch` rows, boxed with logical axis names so that parallel.py
  shards them like the batch, with S5's P' (or S4D's H) over `model`."""
  per_layer = ("state",) if model.layer == "s5" else ("channel", None)
  return nn.Partitioned(stored_states(zero_states(model, batch)),
                        names=("batch", "layers") + per_layer + (None,))


def make_batch_statistics_step(model):
  """(params, batch_stats, batch) -> every BatchNorm's statistics of this batch, in training mode.

  Each layer normalises with the batch's own statistics (as in training), so what a layer sees
  follows from the layers below it as during training; dropout is off, as it is when the
  statistics are used. Flax only exposes the running update momentum * old + (1 - momentum) *
  batch; from zero running statistics that is (1 - momentum) * batch, which is divided back out.
  """
  without_dropout = model.clone(dropout=0.0)

  def batch_statistics(params, batch_stats, batch):
    zeros = jax.tree.map(jnp.zeros_like, batch_stats)
    _, updated = forward(without_dropout, params, zeros, {"inputs": batch["inputs"],
                                                           "mask": batch.get("mask")}, train=True)
    return jax.tree.map(lambda s: s / (1.0 - BATCH_NORM_MOMENTUM), updated)

  return batch_statistics


def recompute_batch_stats(batch_statistics_step, params, batch_stats, batches) -> Any:
  """Population BatchNorm statistics: the mean over `batches` of each batch's mean and variance.

  What the field does before evaluating a checkpoint whose running averages trail its parameters
  (PyTorch's torch.optim.swa_utils.update_bn with momentum=None). Returns batch_stats unchanged
  when there are none or no batches.
  """
  if not batch_stats:
    return batch_stats
  total, count = None, 0
  for batch in batches:
    stats = batch_statistics_step(params, batch_stats, batch)
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    count += 1
  if total is None:
    return batch_stats
  return jax.tree.map(lambda s: s / count, total)
