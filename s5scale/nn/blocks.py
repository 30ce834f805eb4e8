"""Residual SSM block: norm → S5 or S4D → activation (GLU variants as in the S5 paper) → MLP
(optional).

Runs in parallel mode over (batch, L, H), from a zero SSM state or from one carried from the
previous window, or one recurrent step over (batch, H) from the SSM state, so training,
prefill and generation share the same parameters and code.

In parallel mode the residual stream is pinned to the logical axes ("batch", "length",
"act_embed") and each projection group's input to "act_gathered". parallel.py maps the first to
H/model and the second to whole H, so on a `model` mesh axis XLA all-gathers H once before the
S5 input projection, the GLU and the MLP, and reduce-scatters after the S5 readout and the MLP's
output projection; the norms, gates and residual adds run on H/model (their statistics take a
small all-reduce). Outside parallel.logical_constraints the pins are no-ops.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from s5scale.choices import NORMS
from s5scale.nn.s4d import S4D
from s5scale.nn.s5 import S5

# The block input's name for remat policies: the one activation a block saves for its backward.
BLOCK_INPUT = "block_input"


def residual_stream(x):
  """(batch, L, H): pinned to H/model between blocks; (batch, H) in recurrent mode is left be."""
  return nn.with_logical_constraint(x, ("batch", "length", "act_embed")) if x.ndim == 3 else x


def gathered(x):
  """(batch, L, H): whole H on every model shard, as a projection's input."""
  return nn.with_logical_constraint(x, ("batch", "length", "act_gathered")) if x.ndim == 3 else x


def mlp_hidden(x):
  """(batch, L, F): the MLP's hidden width split over model (column-parallel)."""
  return nn.with_logical_constraint(x, ("batch", "length", "mlp")) if x.ndim == 3 else x


def ssm_dtype(x):
  """The SSM's input dtype: at least float32 (a bfloat16 stream is widened; a float64 one, in
  float64 tests, stays)."""
  return jnp.promote_types(x.dtype, jnp.float32)


# Running statistics <- momentum * running + (1 - momentum) * batch's (see Norm).
BATCH_NORM_MOMENTUM = 0.9
LAYERS = {"s5": S5, "s4d": S4D}   # model.layer -> the SSM module


def logical_dense(features, names, dtype, name):
  """Dense whose kernel carries logical axis names, so parallel.py can shard it."""
  return nn.Dense(features, dtype=dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (names[-1],)))


class Norm(nn.Module):
  """Statistics in float32 whatever the input; the output in `dtype` (the residual stream's)."""
  kind: str
  train: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.kind == "layer":
      return nn.LayerNorm(dtype=self.dtype)(x)
    if self.kind == "rms":
      return nn.RMSNorm(dtype=self.dtype)(x)
    if self.kind == "batch":
      # Statistics pool every (batch, time) position (all axes but features), as in the paper.
      # Momentum 0.9 as in the paper's code: with flax's 0.99 the running statistics still hold
      # a third of their initial value after 100 steps, and a short run evaluates badly.
      return nn.BatchNorm(use_running_average=not self.train, axis=-1,
                          momentum=BATCH_NORM_MOMENTUM, dtype=self.dtype)(x)
    raise ValueError(f"norm must be one of {NORMS}, got {self.kind!r}")


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
  residual_dtype: jnp.dtype = jnp.float32  # the stream between blocks; the SSM state is float32
  train: bool = False

  def setup(self):
    self.norm_layer = Norm(self.norm, self.train, self.residual_dtype)
    if self.layer not in LAYERS:
      raise ValueError(f"layer must be one of {tuple(LAYERS)}, got {self.layer!r}")
    # S5's B̄ and C̃ are GEMMs, run with bfloat16 operands when compute_dtype is (float32
    # accumulation); a float32 compute_dtype leaves them in the parameters' dtype, which float64
    # tests need. S4D has no such GEMM.
    narrow = jnp.finfo(self.compute_dtype).bits < 32
    gemm = dict(gemm_dtype=self.compute_dtype) if self.layer == "s5" and narrow else {}
    self.ssm = LAYERS[self.layer](d_model=self.d_model, **self.ssm_kwargs, **gemm)
    self.drop = nn.Dropout(self.dropout, deterministic=not self.train)
    h = self.d_model
    if self.activation == "full_glu":
      self.glu_value = logical_dense(h, ("embed", "mlp"), self.compute_dtype, "glu_value")
    if self.activation in ("full_glu", "half_glu1", "half_glu2"):
      self.glu_gate = logical_dense(h, ("embed", "mlp"), self.compute_dtype, "glu_gate")
    if self.mlp_ratio:
      self.mlp_norm = Norm(self.norm, self.train, self.residual_dtype)
      self.mlp_in = logical_dense(h * self.mlp_ratio, ("embed", "mlp"), self.compute_dtype,
                                  "mlp_in")
      self.mlp_out = logical_dense(h, ("mlp", "embed"), self.compute_dtype, "mlp_out")

  def __call__(self, x, reset, state):
    """Parallel: x (batch, L, H), reset (batch, L) bool or None, and state None -> (x, None), or
    state (batch, P') complex, the SSM state entering the window (carried state) -> (x, the
    state after its last step).

    Recurrent: x (batch, H), state (batch, P') complex -> (x, state). (S4D's state is
    (batch, H, N/2) wherever S5's is (batch, P').)
    """
    # Named so that remat policies can save (or offload) it and recompute everything else.
    x = checkpoint_name(residual_stream(x.astype(self.residual_dtype)), BLOCK_INPUT)
    skip = x
    if self.prenorm:
      x = self.norm_layer(x)
    if x.ndim == 3:
      # Gathered before the float32 cast, so the all-gather moves the residual stream's dtype.
      ssm_input = gathered(x).astype(ssm_dtype(x))
      if state is None:
        x = self.ssm(ssm_input, reset=reset)
      else:
        x, state = self.ssm(ssm_input, reset=reset, initial_state=state)
      x = residual_stream(x)  # reduce-scattered readout
    else:
      state, x = self.ssm.step(state, x.astype(ssm_dtype(x)))
    x = residual_stream((skip + self._activate(x)).astype(self.residual_dtype))
    if not self.prenorm:
      x = self.norm_layer(x)
    if self.mlp_ratio:
      x = residual_stream((x + self._mlp(x)).astype(self.residual_dtype))
    return x, state

  def _activate(self, x):
    """x: the SSM output on H/model. The gates' dense layers are column-parallel: their input is
    gathered once and their output lands on H/model, beside the elementwise work."""
    hidden = self.drop(nn.gelu(x))
    if self.activation == "gelu":
      return hidden
    # Cast before gathering (the dense layers would cast after), so the gather moves matmul bytes.
    gate_input = gathered(hidden.astype(self.compute_dtype))
    gate = jax.nn.sigmoid(residual_stream(self.glu_gate(gate_input)))
    if self.activation == "full_glu":
      return self.drop(residual_stream(self.glu_value(gate_input)) * gate)
    if self.activation == "half_glu1":
      return self.drop(hidden * gate)
    return self.drop(x * gate)  # half_glu2: GELU only on the gate's input

  def _mlp(self, x):
    """Column-parallel in, row-parallel out: one all-gather before, one reduce-scatter after."""
    hidden = self.mlp_norm(x) if self.prenorm else x
    hidden = mlp_hidden(self.mlp_in(gathered(hidden.astype(self.compute_dtype))))
    return residual_stream(self.drop(self.mlp_out(self.drop(nn.gelu(hidden)))))
