"""The rest of the system with model.layer=s4d. Oracles: the 1-device run, shard shapes,
the parallel model's logits, files on disk and exit codes."""

import jax
import numpy as np
import pytest

import re

from s5scale import checkpoint, parallel
from s5scale import training
from s5scale.nn.model import S5Model
from tests import helpers
from tests.helpers import (COLLECTIVES, build_state, hlo_computations, reachable, tiny_config,
                             train_in_process)

S4D = dict(model__layer="s4d", model__s4d_state_size=8)


def test_same_losses_on_every_mesh(tmp_path):
  single = helpers.run("train", "text_small.py", tmp_path / "1x1x1",
                    helpers.overrides(train__num_steps=3, checkpoint__every_steps=100, **S4D))
  assert single.returncode == 0, single.stderr[-3000:]
  reference = helpers.losses(tmp_path / "1x1x1")
  assert sorted(reference) == [1, 2, 3]
  # (data, fsdp, model, context): H over model, and time split over context (the chunked form,
  # its chunk-end recurrence handed across devices; tests/test_context_parallel.py has its
  # exactness).
  for mesh in [(4, 1, 2, 1), (1, 1, 8, 1), (2, 1, 1, 4)]:
    axes = dict(zip(("mesh__data", "mesh__fsdp", "mesh__model", "mesh__context"), mesh))
    config = tiny_config(train__num_steps=3, checkpoint__every_steps=100, **axes, **S4D)
    losses = train_in_process(config, tmp_path / "x".join(map(str, mesh)))
    np.testing.assert_allclose([losses[s] for s in (1, 2, 3)], [reference[s] for s in (1, 2, 3)],
                               rtol=1e-5, err_msg=f"mesh {mesh}")


def test_model_parallel_shards_channels():
  config = tiny_config(mesh__data=2, mesh__fsdp=1, mesh__model=4, **S4D)
  params = build_state(config, parallel.make_mesh(config.mesh)).params["blocks"]["ssm"]
  layers, d_model, half = config.model.num_layers, 16, 4
  expected = {"Lambda_re": (layers, d_model, half), "C": (layers, d_model, half, 2),
              "log_step": (layers, d_model), "D": (layers, d_model)}
  for name, shape in expected.items():
    assert params[name].shape == shape
    sharded = (shape[0], shape[1] // 4) + shape[2:]   # H over the 4 `model` devices
    assert {s.data.shape for s in params[name].addressable_shards} == {sharded}, name


def test_sharded_fft_path_equals_one_device():
  """Tokens without resets take the FFT path; H split over 8 devices gives the same logits."""
  config = tiny_config(mesh__data=1, mesh__fsdp=1, mesh__model=8, **S4D)
  mesh = parallel.make_mesh(config.mesh)
  params = build_state(config, mesh).params
  model = S5Model.from_config(config.model)
  tokens = np.random.default_rng(1).integers(0, 256, (8, 32)).astype(np.int32)

  def logits(variables, inputs):
    with parallel.logical_constraints(mesh):
      return model.apply({"params": variables}, inputs)

  sharded = jax.jit(logits)(params, tokens)
  single = model.apply({"params": jax.device_get(params)}, tokens)
  np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)


def test_no_collective_inside_the_time_recurrence():
  config = tiny_config(mesh__data=2, mesh__fsdp=2, mesh__model=2, **S4D)
  mesh = parallel.make_mesh(config.mesh)
  sample = {"inputs": np.zeros((8, 32), np.int32), "targets": np.zeros((8, 32), np.int32),
            "mask": np.ones((8, 32), np.float32), "reset": np.zeros((8, 32), bool),
            "target_bytes": np.ones((8, 32), np.int32)}
  model, optimizer, schedule, abstract_state, shardings = training.build_model_and_state(
      config, mesh, sample)
  compiled = training.jit_train_step(config, mesh, model, optimizer, schedule, shardings).lower(
      abstract_state, training.abstract_batch(sample, mesh)).compile()
  computations = hlo_computations(compiled.as_text())
  loop_bodies = re.findall(r"while\(.*body=%?([\w.\-]+)", "\n".join(computations.values()))
  innermost = [b for b in loop_bodies
               if not any("while(" in computations[c] for c in reachable(computations, b))]
  assert innermost, "expected the recurrence (resets in the batch) to compile to a loop"
  for body in innermost:
    text = "\n".join(computations[c] for c in reachable(computations, body))
    found = [op for op in COLLECTIVES if re.search(rf"\b{op}(-start)?\(", text)]
    assert not found, f"collective {found} inside loop {body}"


def test_recurrent_logits_match_parallel_model():
  config = tiny_config(**S4D)
  config.data.kind, config.model.vocab_size = "audio", 256
  model = S5Model.from_config(config.model)
  tokens = np.random.default_rng(0).integers(0, 256, (2, 40)).astype(np.int32)
  variables = model.init(jax.random.PRNGKey(0), tokens)
  parallel_logits = np.asarray(model.apply(variables, tokens))       # FFT convolution
  states, prefix_logits = model.apply(variables, tokens[:, :25], method=S5Model.prefill)
  assert states.shape == (2, 2, 16, 4)   # (layers, batch, H, N/2)
  np.testing.assert_allclose(prefix_logits, parallel_logits[:, :25], rtol=1e-4, atol=1e-4)
  step = jax.jit(lambda states, token: model.apply(variables, states, token, method=S5Model.step))
  for t in range(25, 40):
    states, step_logits = step(states, tokens[:, t])
    np.testing.assert_allclose(step_logits, parallel_logits[:, t], rtol=1e-4, atol=1e-4)


def test_checkpoint_evaluates_zero_shot_and_generates(tmp_path):
  flags = helpers.overrides(train__num_steps=2, checkpoint__every_steps=2, **S4D)
  for module, extra in [("train", []), ("evaluate", ["--all"]),
                        ("evaluate", ["--all", "--config.eval.step_rescale=2"]),
                        ("generate", ["--config.generate.length=12"])]:
    result = helpers.run(module, "text_small.py", tmp_path, flags + extra)
    assert result.returncode == 0, (module, result.stderr[-3000:])
  records = {r["split"]: r for r in helpers.read_jsonl(tmp_path / "eval" / "metrics.jsonl")}
  plain, rescaled = records["heldout"], records["heldout_step_rescale2"]
  assert plain["step"] == rescaled["step"] == 2
  assert np.isfinite(rescaled["heldout_step_rescale2/loss"])
  assert rescaled["heldout_step_rescale2/loss"] != plain["heldout/loss"]   # Δ really changed
  samples = sorted(p.name for p in (tmp_path / "samples" / "run_1").glob("step_*"))
  assert samples == ["step_2_sample_0.txt", "step_2_sample_1.txt"]


@pytest.mark.parametrize("bad, named", [
    (["--config.model.layer=s6"], "model.layer"),
    (["--config.model.layer=s4d", "--config.model.s4d_state_size=7"], "model.s4d_state_size"),
    (["--config.model.layer=s4d", "--config.model.s4d_init=hippo"], "model.s4d_init"),
])
def test_bad_layer_config_exits_2(tmp_path, bad, named):
  result = helpers.run("train", "text_small.py", tmp_path, helpers.overrides() + bad)
  assert result.returncode == 2, result.stderr[-2000:]
  assert named in result.stderr


def test_checkpoints_from_before_model_layer_still_restore():
  """A config saved before model.layer existed means S5; switching to S4D is a mismatch."""
  current = tiny_config().to_dict()
  saved = {"model": {k: v for k, v in current["model"].items()
                     if k not in ("layer", "s4d_state_size", "s4d_init")}}
  assert checkpoint.architecture_mismatch(saved, current) == []
  s4d = tiny_config(**S4D).to_dict()
  assert checkpoint.architecture_mismatch(saved, s4d) == [
      "model.layer: checkpoint='s5' config='s4d'",
      "model.s4d_state_size: checkpoint=64 config=8"]
