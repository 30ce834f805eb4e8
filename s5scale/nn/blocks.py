"""Residual SSM block: norm → S5 or S4D → activation (GLU variants as in the S5 paper) → MLP
(optional).

Runs in parallel mode over (batch, L, H), or one recurrent step over (batch, H) when given the
SSM state, so training and generation share the same parameters and code.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from s5scale.nn.s4d import S4D
from s5scale.nn.s5 import S5

ACTIVATIONS = ("full_glu", "half_glu1", "half_glu2", "gelu")
NORMS = ("layer", "rms", "batch")
# Running statistics <- momentum * running + (1 - momentum) * batch's (see Norm).
BATCH_NORM_MOMENTUM = 0.9
LAYERS = {"s5": S5, "s4d": S4D}   # model.layer -> the SSM module


def logical_dense(features, names, dtype, name):
  """Dense whose kernel carries logical axis names, so parallel.py can shard it."""
  return nn.Dense(features, dtype=dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (names[-1],)))


class Norm(nn.Module):
  kind: str
  train: bool = False

  @nn.compact
  def __call__(self, x):
    if self.kind == "layer":
      return nn.LayerNorm()(x)
    if self.kind == "rms":
      return nn.RMSNorm()(x)
    # Statistics pool every (batch, time) position (all axes but features), as in the paper.
    # Momentum 0.9 as in the paper's code: with flax's 0.99 the running statistics still hold a
    # third of their initial value after 100 steps, and a short run evaluates badly.
    return nn.BatchNorm(use_running_average=not self.train, axis=-1,
                        momentum=BATCH_NORM_MOMENTUM)(x)


class ResidualBlock(nn.Module):
  """One residual block; `ssm_kwargs` are the `layer` module's fields other than d_model."""
  d_model: int
  ssm_kwargs: dict
  layer: str = "s5"                # "s5" or "s4d" (LAYERS)
  norm: str = "layer"
  prenorm: bool = True
  activation: str = "half_glu1"
  mlp_ratio: int = 0
  dropout: float = 0.0
  compute_dtype: jnp.dtype = jnp.float32
  train: bool = False
  prefill: bool = False           # parallel mode that also returns the final SSM state

  def setup(self):
    self.norm_layer = Norm(self.norm, self.train)
    if self.layer not in LAYERS:
      raise ValueError(f"layer must be one of {tuple(LAYERS)}, got {self.layer!r}")
    self.ssm = LAYERS[self.layer](d_model=self.d_model, **self.ssm_kwargs)
    self.drop = nn.Dropout(self.dropout, deterministic=not self.train)
    h = self.d_model
    if self.activation == "full_glu":
      self.glu_value = logical_dense(h, ("embed", "mlp"), self.compute_dtype, "glu_value")
    if self.activation in ("full_glu", "half_glu1", "half_glu2"):
      self.glu_gate = logical_dense(h, ("embed", "mlp"), self.compute_dtype, "glu_gate")
    if self.mlp_ratio:
      self.mlp_norm = Norm(self.norm, self.train)
      self.mlp_in = logical_dense(h * self.mlp_ratio, ("embed", "mlp"), self.compute_dtype,
                                  "mlp_in")
      self.mlp_out = logical_dense(h, ("mlp", "embed"), self.compute_dtype, "mlp_out")

  def __call__(self, x, reset, state):
    """Parallel: x (batch, L, H), reset (batch, L) bool or None, state None -> (x, None), or
    (x, final state (batch, P')) with prefill.

    Recurrent: x (batch, H), state (batch, P') complex -> (x, state). (S4D's state is
    (batch, H, N/2) wherever S5's is (batch, P').)
    """
    skip = x
    if self.prenorm:
      x = self.norm_layer(x)
    if state is None:
      ssm_input = x.astype(jnp.float32)
      x = self.ssm(ssm_input, reset=reset)
      if self.prefill:
        state = self.ssm.final_state(ssm_input, reset=reset)
    else:
      state, x = self.ssm.step(state, x.astype(jnp.float32))
    x = skip + self._activate(x)
    if not self.prenorm:
      x = self.norm_layer(x)
    if self.mlp_ratio:
      x = x + self._mlp(x)
    return x, state

  def _activate(self, x):
    if self.activation == "full_glu":
      hidden = self.drop(nn.gelu(x))
      return self.drop(self.glu_value(hidden) * jax.nn.sigmoid(self.glu_gate(hidden)))
    if self.activation == "half_glu1":
      hidden = self.drop(nn.gelu(x))
      return self.drop(hidden * jax.nn.sigmoid(self.glu_gate(hidden)))
    if self.activation == "half_glu2":  # GELU only on the gate's input
      hidden = self.drop(nn.gelu(x))
      return self.drop(x * jax.nn.sigmoid(self.glu_gate(hidden)))
    return self.drop(nn.gelu(x))

  def _mlp(self, x):
    hidden = self.mlp_norm(x) if self.prenorm else x
    return self.drop(self.mlp_out(self.drop(nn.gelu(self.mlp_in(hidden)))))
