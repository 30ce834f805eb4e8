"""Deep S5 stack: input (token embedding or linear encoder) → N residual blocks → head.

Blocks are stacked with nn.scan so compile time does not grow with depth; the same stacked
parameters serve the parallel forward and the recurrent step used for generation.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from s5scale.nn.blocks import LAYERS, BLOCK_INPUT, Norm, ResidualBlock, gathered, \
    logical_dense, residual_stream
from s5scale.nn.s5 import zero_state

# jax.checkpoint policies per block. Under nn.scan a rematerialised block keeps its input for
# the backward pass whatever the policy (it is the recomputation's starting point), so "full"
# saves exactly each block's input and recomputes the rest. "offload" keeps that same input in
# the host's pinned memory instead of HBM (TPU backends with host offload), and "dots" also
# saves the matmul outputs.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[BLOCK_INPUT],
        offload_src="device", offload_dst="pinned_host"),
}

# model.layer -> {the SSM module's field: the config.model key that sets it}
SSM_CONFIG_KEYS = {
    "s5": {k: k for k in ("ssm_size", "blocks", "conj_sym", "bidirectional", "discretization",
                          "c_init", "dt_min", "dt_max", "clip_eigs", "step_rescale", "scan_impl")},
    "s4d": {"state_size": "s4d_state_size", "lambda_init": "s4d_init",
            **{k: k for k in ("bidirectional", "dt_min", "dt_max", "clip_eigs", "step_rescale")}},
}
# config.model keys that are S5Model fields of the same name.
MODEL_CONFIG_KEYS = ("task", "input_kind", "vocab_size", "num_classes", "num_layers", "d_model",
                     "norm", "prenorm", "activation", "mlp_ratio", "dropout", "pooling",
                     "scan_layers", "remat", "layer")


class S5Model(nn.Module):
  """Token or continuous inputs (batch, L[, C]) -> LM logits (batch, L, V) or class logits (batch, K)."""
  task: str = "lm"
  input_kind: str = "tokens"
  vocab_size: int = 256
  num_classes: int = 0
  num_layers: int = 4
  d_model: int = 128
  ssm_kwargs: dict = None           # SSM layer fields other than d_model
  layer: str = "s5"                 # "s5" or "s4d"
  norm: str = "layer"
  prenorm: bool = True
  activation: str = "half_glu1"
  mlp_ratio: int = 0
  dropout: float = 0.0
  pooling: str = "mean"
  compute_dtype: jnp.dtype = jnp.float32
  residual_dtype: jnp.dtype = jnp.float32  # between blocks; parameters and the scan stay float32
  scan_layers: bool = True
  remat: str = "none"

  @classmethod
  def from_config(cls, model_config, **overrides) -> "S5Model":
    """The model that config.model (s5scale/defaults.py) describes; `overrides` replace fields,
    and `step_rescale` multiplies the SSM's (zero-shot evaluation at another sample rate)."""
    step_rescale = overrides.pop("step_rescale", 1.0)
    fields = {k: model_config[k] for k in MODEL_CONFIG_KEYS}
    fields["ssm_kwargs"] = {field: model_config[key]
                            for field, key in SSM_CONFIG_KEYS[model_config.layer].items()}
    fields["ssm_kwargs"]["step_rescale"] *= step_rescale
    fields["compute_dtype"] = jnp.dtype(model_config.compute_dtype)
    fields["residual_dtype"] = jnp.dtype(model_config.residual_dtype)
    return cls(**{**fields, **overrides})

  def _stack(self, train: bool):
    block = ResidualBlock
    if self.remat != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers)
    kwargs = dict(d_model=self.d_model, ssm_kwargs=self.ssm_kwargs or {}, layer=self.layer,
                  norm=self.norm,
                  prenorm=self.prenorm, activation=self.activation, mlp_ratio=self.mlp_ratio,
                  dropout=self.dropout, compute_dtype=self.compute_dtype,
                  residual_dtype=self.residual_dtype, train=train)
    if not self.scan_layers:
      return [block(**kwargs, name=f"block_{i}") for i in range(self.num_layers)]
    scanned = nn.scan(block, variable_axes={"params": 0, "batch_stats": 0},
                      split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast, 0),
                      length=self.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(**kwargs, name="blocks")

  def _run_blocks(self, x, reset, states, train: bool):
    """x (batch, L, H) (parallel) or (batch, H) (recurrent); states None (parallel from zero
    states) or (num_layers, batch, P') complex: each layer's state entering the window (carried)
    or the step.

    Returns x and the layers' states: None in plain parallel mode, (num_layers, batch, P') else.
    """
    stack = self._stack(train)
    if self.scan_layers:
      return stack(x, reset, states)
    new_states = []
    for i, block in enumerate(stack):
      x, state = block(x, reset, None if states is None else states[i])
      new_states.append(state)
    return x, (jnp.stack(new_states) if new_states[0] is not None else None)

  def _embed(self, inputs):
    """The residual stream's start: (batch, L, H/model) in residual_dtype (or (batch, H))."""
    if self.input_kind == "tokens":
      embed = nn.Embed(self.vocab_size, self.d_model, name="embed", embedding_init=(
          nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed"))))
      x = embed(inputs)
    else:
      x = logical_dense(self.d_model, (None, "embed"), self.compute_dtype, "encoder")(inputs)
    return residual_stream(x.astype(self.residual_dtype))

  def _final_norm(self, x, train: bool):
    return Norm(self.norm, train, self.residual_dtype, name="final_norm")(x)

  def _head(self, x):
    features = self.vocab_size if self.task == "lm" else self.num_classes
    head = logical_dense(features, ("embed", "vocab"), self.compute_dtype, "head")
    logits = head(gathered(x))
    # The loss is always computed in at least float32 (float64 in float64 tests).
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))

  @nn.compact
  def __call__(self, inputs, *, reset=None, mask=None, train: bool = False, states=None):
    """Parallel mode.

    Args:
      inputs: (batch, L) int32 tokens, or (batch, L, C) float for continuous inputs.
      reset: (batch, L) bool, True at the first step of each packed document (or item).
      mask: (batch, L) float, 1 on real steps (classifier pooling honours it).
      states: None, or "lm" only, every layer's SSM state entering this window
        ((num_layers, batch, P') complex; S4D (num_layers, batch, H, N/2)): the window continues
        the previous one (carried state, zero_states for the first).
    Returns:
      (batch, L, vocab) float32 logits for "lm", (batch, num_classes) for "classify"; with
      states, (logits, final_states), final_states shaped as states: the states after the last
      step, for the next window or for `step`.
    """
    if states is not None and self.task != "lm":
      raise ValueError(f"carried states need task='lm' (a causal stream), got {self.task!r}")
    x, final_states = self._trunk(inputs, reset, train, states)
    if self.task == "lm":
      logits = self._head(x)
      return logits if states is None else (logits, final_states)
    return self._head(pool(x.astype(jnp.float32), mask, self.pooling))

  @nn.compact
  def pooled_features(self, inputs, *, mask=None):
    """Classifier: the pooled features its linear head reads, and the logits (evaluation mode).

    The penultimate features of a classifier, e.g. for FID (s5scale/sample_metrics.py). Same
    parameters and statistics as __call__; nothing is added to a checkpoint.

    Args:
      inputs: (batch, L, C) float.
      mask: (batch, L) float, 1 on real steps.
    Returns:
      ((batch, d_model) float32 features, (batch, num_classes) float32 logits).
    """
    x, _ = self._trunk(inputs, None, train=False)
    features = pool(x.astype(jnp.float32), mask, self.pooling)
    return features.astype(jnp.float32), self._head(features)

  def _trunk(self, inputs, reset, train: bool, states=None):
    """(batch, L[, C]) inputs -> (batch, L, H) normalised outputs of the last block, and the
    layers' final states (None without entering states)."""
    x, final_states = self._run_blocks(self._embed(inputs), reset, states, train)
    return self._final_norm(x, train), final_states

  def prefill(self, inputs):
    """Parallel scan over a prompt from zero states, returning what `step` needs to continue
    from it (one scan: the carried-state call).

    Args:
      inputs: (batch, L) int32 tokens, or (batch, L, C) float.
    Returns:
      (states (num_layers, batch, P') complex, (batch, L, vocab) float32 logits).
    """
    logits, states = self(inputs, states=zero_states(self, inputs.shape[0]))
    return states, logits

  @nn.compact
  def step(self, states, inputs_t):
    """Recurrent mode: one step of every layer, O(1) in the context length.

    Args:
      states: (num_layers, batch, P') complex.
      inputs_t: (batch,) int32 tokens, or (batch, C) float.
    Returns:
      (states, (batch, vocab) float32 logits).
    """
    x = self._embed(inputs_t)
    x, states = self._run_blocks(x, None, states, train=False)
    return states, self._head(self._final_norm(x, False))


def pool(x, mask, pooling: str):
  """(batch, L, H) -> (batch, H): masked mean, or the last real step."""
  if mask is None:
    mask = jnp.ones(x.shape[:2], x.dtype)
  mask = mask.astype(x.dtype)
  if pooling == "mean":
    return jnp.sum(x * mask[..., None], axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1)[:, None]
  last = jnp.maximum(jnp.sum(mask, axis=1).astype(jnp.int32) - 1, 0)
  return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]


def zero_states(model, batch: int):
  """Every layer's zero SSM state: the first window's `states`, or `step`'s before any input.

  Args:
    model: an S5Model, or the config.model that describes one (S5Model.from_config).
    batch: rows.
  Returns:
    (num_layers, batch, P') complex for S5, (num_layers, batch, H, N/2) for S4D; complex64
    (complex128 for float64 SSM parameters).
  """
  if not isinstance(model, S5Model):
    model = S5Model.from_config(model)
  # parent=None: a free-standing description of the layer, also inside a bound model's method.
  layer = LAYERS[model.layer](d_model=model.d_model, **(model.ssm_kwargs or {}), parent=None)
  return jnp.broadcast_to(zero_state(layer, batch), (model.num_layers, batch)
                          + tuple(layer.state_shape()))
