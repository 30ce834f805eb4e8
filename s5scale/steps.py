"""Loss, train step and eval step, shared by training, evaluation and sampling.

Every metric is accumulated as sums (negative log-likelihood, weights, bytes, correct) so that
micro-batches, padded eval batches and whole splits aggregate exactly.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from s5scale import optim
from s5scale.nn.blocks import BATCH_NORM_MOMENTUM


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # completed updates
  params: Any
  opt_state: Any
  batch_stats: Any           # BatchNorm running statistics ({} without BatchNorm)
  rng: jax.Array             # base key: step k uses fold_in(rng, k)
  bad_steps: jax.Array       # consecutive non-finite updates (skipped)
  skipped_steps: jax.Array   # all skipped updates


def forward(model, params, batch_stats, batch: dict, *, train: bool, rng=None):
  """Model outputs and updated BatchNorm statistics."""
  variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
  kwargs = dict(reset=batch.get("reset"), mask=batch.get("mask"), train=train)
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
    logits, batch_stats = forward(model, params, state.batch_stats, micro_batch, train=True,
                                  rng=rng)
    sums = metric_sums(logits, micro_batch, task)
    return mean_loss(sums), (sums, batch_stats)

  def train_step(state: TrainState, batch: dict):
    (loss, (sums, batch_stats)), grads = optim.accumulated_value_and_grad(
        lambda p, b, i: loss_fn(p, state, b, i), state.params, batch, accum_steps)
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
        skipped_steps=state.skipped_steps + jnp.where(finite, 0, 1))
    metrics = dict(loss=loss, grad_norm=grad_norm, learning_rate=schedule(state.step),
                   accuracy=sums["correct_sum"] / jnp.maximum(sums["weight_sum"], 1.0),
                   bad_steps=new_state.bad_steps, skipped_steps=new_state.skipped_steps)
    return new_state, metrics

  return train_step


def make_eval_step(model, task: str):
  """(params, batch_stats, batch) -> metric sums, with dropout off and BatchNorm frozen."""

  def eval_step(params, batch_stats, batch):
    logits, _ = forward(model, params, batch_stats, batch, train=False)
    return metric_sums(logits, batch, task)

  return eval_step


def init_train_state(model, optimizer, config, sample_batch: dict) -> TrainState:
  """Fresh state; call under jit with out_shardings so it is created already sharded."""
  rng = jax.random.PRNGKey(config.train.seed)
  variables = model.init({"params": jax.random.fold_in(rng, -1 % 2**31)},
                         sample_batch["inputs"], reset=sample_batch.get("reset"),
                         mask=sample_batch.get("mask"), train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    batch_stats=variables.get("batch_stats", {}), rng=rng,
                    bad_steps=jnp.zeros((), jnp.int32), skipped_steps=jnp.zeros((), jnp.int32))


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
