"""Declarative config validation: every key in defaults.py has a constraint, a value that breaks it
exits 2 naming the key, and each entry point (and the launcher) runs the check before anything."""

import glob
import os
import runpy
import subprocess
import sys

import ml_collections
import pytest

from s5scale import cli, config_check, config_schema, defaults
from tests import helpers

TEXT_SMALL = os.path.join(helpers.REPO, "configs", "text_small.py")

# Values that must be refused, written by hand for each key: negative rates and step counts,
# unknown choices, wrong types, zero and negative sizes. The test below fails when a key is
# added to defaults.py without a row here.
BAD_VALUES = {
    "model.task": ["regress", 1],
    "model.layer": ["s4", "mamba"],
    "model.s4d_state_size": [0, -64, 1.5],
    "model.s4d_init": ["inv"],
    "model.input_kind": ["pixels"],
    "model.vocab_size": [0, -1, 2.5],
    "model.num_classes": [-1, "ten"],
    "model.num_layers": [0, -3, "4", True],
    "model.d_model": [0, -128, 64.0],
    "model.ssm_size": [0, -2],
    "model.blocks": [0, -1],
    "model.conj_sym": [1, "yes"],
    "model.bidirectional": [0, "no"],
    "model.discretization": ["euler"],
    "model.c_init": ["zeros"],
    "model.dt_min": [0.0, -1e-3, float("nan")],
    "model.dt_max": [0.0, -0.1, float("inf")],
    "model.clip_eigs": ["true"],
    "model.step_rescale": [0.0, -2.0],
    "model.scan_impl": ["magic"],
    "model.norm": ["group"],
    "model.prenorm": [None],
    "model.activation": ["relu"],
    "model.mlp_ratio": [-1],
    "model.dropout": [-0.1, 1.0, 1.5],
    "model.pooling": ["max"],
    "model.compute_dtype": ["float16", "fp8"],
    "model.scan_layers": [2],
    "model.remat": ["everything"],
    "model.residual_dtype": ["float16", 32],
    "data.kind": ["video", ""],
    "data.source": [3],
    "data.tokenizer": ["", None],
    "data.mixture": ["a:1", "a:0,b:1", 5],
    "data.text_extensions": [None],
    "data.jsonl_field": [""],
    "data.long_audio_seconds": [-1.0],
    "data.batch_size": [0, -8],
    "data.seq_len": [0, -1],
    "data.seed": [-1, 0.5],
    "data.heldout_fraction": [-0.1, 1.0],
    "data.heldout_source": [None, 3],
    "data.sample_rate": [0, -16000],
    "data.quantization": ["alaw"],
    "data.bits": [0, 17],
    "data.num_workers": [-1],
    "data.task": ["segment"],
    "data.read_threads": [0],
    "data.carry_state": [1, "yes", None],
    "eval.carry_state": [1, "yes", None],
    "optim.learning_rate": [-1.0, float("nan"), "fast"],
    "optim.ssm_learning_rate": [-1e-3],
    "optim.weight_decay": [-0.05],
    "optim.b1": [-0.1, 1.0],
    "optim.b2": [1.0, 1.5],
    "optim.warmup_steps": [-1],
    "optim.schedule": ["linear"],
    "optim.min_lr_ratio": [-0.1, 1.5],
    "optim.clip_norm": [-1.0],
    "optim.grad_accum_steps": [0, -2],
    "train.num_steps": [-5, 0],
    "train.seed": [-1],
    "train.log_every_steps": [0],
    "train.max_bad_steps": [0],
    "mesh.data": [0, -2],
    "mesh.fsdp": [0, -3],
    "mesh.model": [0],
    "mesh.dcn_data": [0],
    "mesh.dcn_fsdp": [-5],
    "mesh.dcn_model": [0],
    "mesh.context": [0, -4],
    "mesh.dcn_context": [0],
    "checkpoint.every_steps": [0, -200],
    "checkpoint.every_minutes": [-1.0, "hourly"],
    "checkpoint.keep": [0, -1],
    "checkpoint.keep_every": [-1],
    "checkpoint.init_from": [None],
    "checkpoint.async_save": ["sometimes"],
    "eval.every_steps": [-1],
    "eval.max_batches": [-1],
    "eval.batch_size": [-8],
    "eval.seq_len": [-1],
    "eval.step_rescale": [0.0, -1.0],
    "eval.compressor_baselines": ["xz"],
    "eval.recompute_batch_stats": [-1, 2.5],
    "eval.lowpass_hz": [-1.0, float("nan")],
    "data.bandlimit_prob": [-0.1, 1.5, float("nan")],
    "data.bandlimit_hz": [-1.0, float("nan")],
    "generate.num_samples": [0],
    "generate.length": [0, -1],
    "generate.temperature": [-1.0],
    "generate.top_p": [0.0, 1.5],
    "generate.prompt": [None],
    "generate.seed": [-1],
}

# Values each fine on their own that break a rule across keys; (changes, key named).
CROSS_KEY = [
    ({"model.dt_min": 0.2, "model.dt_max": 0.1}, "model.dt_min"),
    ({"model.dt_min": 0.1, "model.dt_max": 0.1}, "model.dt_max"),
    ({"model.ssm_size": 24, "model.blocks": 5}, "model.blocks"),
    ({"model.ssm_size": 24, "model.blocks": 8}, "model.conj_sym"),  # 3 states per block: odd
    ({"data.task": "classify"}, "data.task"),
    ({"model.vocab_size": 256}, "model.vocab_size"),                # bytes need 260
    ({"optim.warmup_steps": 101, "train.num_steps": 100}, "optim.warmup_steps"),
    ({"checkpoint.keep_every": 300, "checkpoint.every_steps": 200}, "checkpoint.keep_every"),
    ({"data.batch_size": 8, "mesh.fsdp": 3}, "data.batch_size"),
    ({"data.batch_size": 8, "optim.grad_accum_steps": 3}, "optim.grad_accum_steps"),
    ({"model.d_model": 12, "mesh.model": 8}, "model.d_model"),
    ({"model.d_model": 16, "mesh.dcn_fsdp": 3}, "model.d_model"),
    ({"model.ssm_size": 24, "mesh.model": 8}, "model.ssm_size"),  # 12 complex states
    ({"eval.lowpass_hz": 4000.0}, "eval.lowpass_hz"),
    ({"data.bandlimit_prob": 0.5, "data.bandlimit_hz": 1000.0}, "data.task"),  # an LM's rows
    ({"model.layer": "s4d", "model.s4d_state_size": 63}, "model.s4d_state_size"),
    ({"model.layer": "s4d", "model.discretization": "bilinear"}, "model.discretization"),
    ({"data.mixture": "a=x:1,b=y:1", "data.source": "z"}, "data.source"),
    ({"data.mixture": "a=x:1,b=y:1", "data.heldout_source": "z"}, "data.heldout_source"),
    ({"data.carry_state": True, "model.bidirectional": True}, "model.bidirectional"),
    ({"data.carry_state": True, "model.task": "classify"}, "data.carry_state"),
    ({"eval.carry_state": True, "model.bidirectional": True}, "eval.carry_state"),
    ({"data.kind": "text", "data.task": "classify"}, "data.kind"),               # an LM has no clips to filter
]

# Edge values that must pass: the validator does not refuse everything.
GOOD_EDGES = [
    {"optim.learning_rate": 0.0}, {"optim.warmup_steps": 0}, {"mesh.data": -1, "mesh.fsdp": 2},
    {"eval.every_steps": 0}, {"generate.top_p": 1.0}, {"generate.temperature": 0.0},
    {"model.dropout": 0.0}, {"data.heldout_fraction": 0.0}, {"checkpoint.every_steps": 200, "checkpoint.keep_every": 400},
    {"model.ssm_size": 24, "model.blocks": 3}, {"optim.warmup_steps": 8000},
    {"model.layer": "s4d", "model.ssm_size": 24, "model.blocks": 5},  # S5's keys: not S4D's
    {"data.carry_state": True}, {"eval.carry_state": True},
    {"data.carry_state": True, "data.mixture": "a=x:1,b=y:1", "data.source": ""},  # mixtures too
]


def text_small_with(changes: dict) -> ml_collections.ConfigDict:
  """configs/text_small.py with `changes` set as they are (no type checks: a config file can
  replace a whole section, so wrong types do reach the validator)."""
  values = runpy.run_path(TEXT_SMALL)["get_config"]().to_dict()
  for key, value in changes.items():
    section, name = key.split(".")
    values[section][name] = value
  return ml_collections.ConfigDict(values)


def exit_code_and_stderr(config, capsys) -> tuple[int, str]:
  """cli.exit_if_invalid: the check cli.parse_flags runs for every entry point."""
  try:
    cli.exit_if_invalid(config)
    code = 0
  except SystemExit as stop:
    code = stop.code
  return code, capsys.readouterr().err


def test_every_key_in_defaults_has_a_constraint():
  keys = set(config_schema.flat_values(defaults.base_config()))
  assert keys == set(defaults.CONSTRAINTS)
  with pytest.raises(TypeError, match="model.new_key has no constraint"):
    config_schema.build_config({"model": {"new_key": 3}})  # a bare default fails at import


def test_fuzz_table_covers_every_key():
  assert set(defaults.CONSTRAINTS) - set(BAD_VALUES) == set(), "add bad values for new keys"


def test_defaults_and_every_config_file_are_valid():
  paths = sorted(glob.glob(os.path.join(helpers.REPO, "configs", "*.py")))
  assert len(paths) >= 6  # text/audio small and large, spoken digits, speech commands
  configs = {"defaults": defaults.base_config()}
  configs.update({path: runpy.run_path(path)["get_config"]() for path in paths})
  for name, config in configs.items():
    assert config_schema.violations(config, defaults.CONSTRAINTS, defaults.RULES) == [], name


# Choices that name code paths (s5scale/choices.py, keyed into the code's tables), so what is
# checked here is behaviour: each allowed value runs through the model that S5Model.from_config builds from a
# config (values outside are refused by validate: BAD_VALUES above). The extra keys route a value
# to the code that reads it.
MODEL_CHOICES = {
    "model.layer": {}, "model.norm": {}, "model.activation": {}, "model.remat": {},
    "model.discretization": {}, "model.c_init": {}, "model.scan_impl": {},
    "model.s4d_init": {"model.layer": "s4d"},
}


def test_every_allowed_choice_runs_in_the_model():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from s5scale.nn.model import S5Model  # pylint: disable=g-import-not-at-top
  tiny = {"model.num_layers": 1, "model.d_model": 8, "model.ssm_size": 4, "model.blocks": 1,
          "model.s4d_state_size": 4}
  tokens = jnp.zeros((1, 8), jnp.int32)
  for key, route in MODEL_CHOICES.items():
    for value in defaults.CONSTRAINTS[key].choices:
      config = text_small_with({**tiny, **route, key: value})
      model = S5Model.from_config(config.model)
      # Traced, not compiled: the value must reach and pass the code that reads it.
      variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
      logits = jax.eval_shape(model.apply, variables, tokens)
      assert logits.shape == (1, 8, config.model.vocab_size), (key, value)


def test_the_tables_of_code_are_keyed_by_exactly_the_choices():
  from s5scale import choices  # pylint: disable=g-import-not-at-top
  from s5scale.data import audio  # pylint: disable=g-import-not-at-top
  from s5scale.nn import blocks, model  # pylint: disable=g-import-not-at-top
  assert tuple(blocks.LAYERS) == choices.LAYERS
  assert tuple(model.REMAT_POLICIES) == choices.REMAT_POLICIES
  assert tuple(audio.CODECS) == choices.QUANTIZATIONS


def test_checking_a_config_loads_no_jax(tmp_path):
  # A fresh interpreter: the pod launcher's validate, and a program refusing a bad config.
  probe = ("import runpy, sys\nsys.argv = sys.argv[1:]\n"
           "try:\n  runpy.run_module(sys.argv[0], run_name='__main__')\n"
           "except SystemExit as done:\n"
           "  print('exit', done.code, 'jax' in sys.modules, file=sys.stderr)\n")
  for program, flags in (("s5scale.validate", []),
                         ("s5scale.train", [f"--workdir={tmp_path}", "--config.model.d_model=-3"])):
    result = subprocess.run([sys.executable, "-c", probe, program, f"--config={TEXT_SMALL}",
                             *flags], env=helpers.env_for(), capture_output=True, text=True,
                            timeout=120, cwd=helpers.REPO)
    code = 0 if program == "s5scale.validate" else 2
    assert f"exit {code} False" in result.stderr, (program, result.stderr[-2000:])
  assert not os.listdir(tmp_path)


def test_quantization_choices_are_what_audio_implements():
  import numpy as np  # pylint: disable=g-import-not-at-top
  from s5scale.data import audio  # pylint: disable=g-import-not-at-top
  choices = defaults.CONSTRAINTS["data.quantization"].choices
  waveform = np.linspace(-1, 1, 101, dtype=np.float32)
  for method in choices:
    decoded = audio.dequantize(audio.quantize(waveform, method, 8), method, 8)
    np.testing.assert_allclose(decoded, waveform, atol=0.05, err_msg=method)


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_each_bad_value_exits_2_naming_the_key(key, capsys):
  for value in BAD_VALUES[key]:
    code, stderr = exit_code_and_stderr(text_small_with({key: value}), capsys)
    assert code == 2, (key, value)
    assert f"{key}={value!r}" in stderr, (key, value, stderr)


@pytest.mark.parametrize("changes, named", CROSS_KEY)
def test_cross_key_violations_exit_2_naming_the_keys(changes, named, capsys):
  code, stderr = exit_code_and_stderr(text_small_with(changes), capsys)
  assert code == 2 and named in stderr, stderr
  assert all(k in stderr for k in changes), stderr


@pytest.mark.parametrize("changes", GOOD_EDGES)
def test_edge_values_pass(changes, capsys):
  assert exit_code_and_stderr(text_small_with(changes), capsys) == (0, "")


def test_all_violations_are_reported_at_once(capsys):
  code, stderr = exit_code_and_stderr(text_small_with(
      {"optim.learning_rate": -1.0, "train.num_steps": -5, "data.kind": "video"}), capsys)
  assert code == 2
  for expected in ("optim.learning_rate=-1.0", "train.num_steps=-5", "data.kind='video'"):
    assert expected in stderr


def test_mesh_checked_again_once_devices_fill_in_minus_one():
  import jax
  devices = jax.devices()[:8]
  config = text_small_with({"data.batch_size": 4, "mesh.data": -1})
  config_check.check(config)  # the config alone cannot know that -1 means 8 here
  with pytest.raises(config_schema.ConfigError, match=r"data.batch_size=4.*mesh.data=8"):
    config_check.check_on_devices(config, devices, process_count=1)
  with pytest.raises(config_schema.ConfigError, match="process count"):
    config_check.check_on_devices(text_small_with({"data.batch_size": 8}), devices, process_count=3)


# ---------------------------------------------------------------- real processes: exit codes

def run_module(args: list[str], timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], env=helpers.env_for(), capture_output=True,
                        text=True, timeout=timeout, cwd=helpers.REPO)


@pytest.mark.parametrize("entry, flag, named", [
    ("s5scale.train", "--config.optim.learning_rate=-1", "optim.learning_rate=-1.0"),
    ("s5scale.train", "--config.train.num_steps=-5", "train.num_steps=-5"),
    ("s5scale.train", "--config.data.kind=video", "data.kind='video'"),
    ("s5scale.evaluate", "--config.model.dt_min=0.5", "model.dt_min=0.5"),
    ("s5scale.generate", "--config.generate.top_p=0", "generate.top_p=0.0"),
    ("s5scale.validate", "--config.model.num_layers=abc", "config.model.num_layers"),
    ("tools/aot_compile.py", "--config.checkpoint.keep=0", "checkpoint.keep=0"),
])
def test_entry_points_exit_2_before_reading_anything(tmp_path, entry, flag, named):
  args = ["-m", entry] if entry.startswith("s5scale") else [entry, "--topology=v5e:2x2"]
  args += [f"--config={TEXT_SMALL}", flag]
  if entry != "s5scale.validate" and not entry.startswith("tools"):
    args.append(f"--workdir={tmp_path}")
  result = run_module(args)
  assert result.returncode == 2, result.stderr[-3000:]
  assert named in result.stderr, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert os.listdir(tmp_path) == []  # nothing written: not even a log file


def test_validate_accepts_a_good_config():
  result = run_module(["-m", "s5scale.validate", f"--config={TEXT_SMALL}",
                       "--config.train.num_steps=700"])
  assert result.returncode == 0, result.stderr[-3000:]


def test_tpu_pod_validates_before_any_cloud_call(tmp_path):
  env = dict(os.environ, PYTHON=sys.executable, TPU_NAME="t", ZONE="z", WORKDIR="gs://b/run",
             ACCELERATOR_TYPE="v5litepod-16", PATH=f"{tmp_path}:{os.environ['PATH']}")
  calls = tmp_path / "calls"
  (tmp_path / "gcloud").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
  (tmp_path / "gcloud").chmod(0o755)
  result = subprocess.run([os.path.join(helpers.REPO, "launch", "tpu_pod.sh"),
                           "configs/text_small.py", "--config.optim.learning_rate=-1"],
                          cwd=helpers.REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "optim.learning_rate=-1.0" in result.stderr
  assert not calls.exists()


def test_a_dict_valued_key_is_one_value_with_its_own_check():
  sections = {"data": {"mixture": config_schema.field(
      {"web": 0.7, "code": 0.3}, config_schema.Check(
          lambda weights: all(w > 0 for w in weights.values()), "a dict of positive weights"))}}
  config = config_schema.build_config(sections)
  constraints = config_schema.constraints_of(sections)
  assert config_schema.violations(config, constraints, []) == []
  config.data.mixture.code = -0.3
  assert config_schema.violations(config, constraints, []) == [
      "data.mixture={'code': -0.3, 'web': 0.7}: must be a dict of positive weights"]  # sorted


# At or above Nyquist is allowed (nothing to remove: the 16 kHz recipe evaluated at 8 kHz).
@pytest.mark.parametrize("cutoff_hz, code", [(3999.0, 0), (0.0, 2), (8000.0, 0)])
def test_bandlimit_needs_a_cutoff(cutoff_hz, code, capsys):
  values = runpy.run_path(os.path.join(helpers.REPO, "configs", "speech_commands.py"))[
      "get_config"]().to_dict()
  values["data"].update(bandlimit_prob=0.5, bandlimit_hz=cutoff_hz)
  exit_code, stderr = exit_code_and_stderr(ml_collections.ConfigDict(values), capsys)
  assert exit_code == code, stderr
  assert code == 0 or "data.bandlimit_hz=" in stderr, stderr
