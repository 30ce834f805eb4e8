"""The eval job and sampling. Oracles: a float64 NumPy cross-entropy of the training-
mode forward pass, the parallel model's logits, files on disk and a training process running
beside the eval job."""

import os
import subprocess
import time

import jax
import numpy as np
import pytest
import soundfile

from s5scale import checkpoint, data, evaluation, inference, parallel
from s5scale.nn.model import S5Model
from tests import helpers
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def trained_text(tmp_path_factory):
  """A 2-step text run trained with dropout on, on 8 virtual devices."""
  workdir = tmp_path_factory.mktemp("text")
  flags = helpers.overrides(train__num_steps=2, checkpoint__every_steps=2, model__dropout=0.2)
  result = helpers.run("train", "text_small.py", workdir, flags, devices=8)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.mark.parametrize("eval_seq_len", [0, 64])   # 0: rows of data.seq_len (32)
def test_eval_loss_equals_training_forward_without_dropout(trained_text, eval_seq_len):
  config = tiny_config(model__dropout=0.2, eval__max_batches=1, eval__seq_len=eval_seq_len)
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
  model = S5Model.from_config(config.model)
  rows = config.data.copy_and_resolve_references()
  rows.seq_len = eval_seq_len or rows.seq_len
  batch = next(data.make_iterator(rows, "heldout", num_epochs=1))
  assert batch["inputs"].shape[1] == (eval_seq_len or 32)
  abstract = inference.abstract_variables(model, mesh, batch["inputs"])
  manager = checkpoint.open_readonly(str(trained_text))
  variables = checkpoint.restore_subset(manager, 2, abstract)
  eval_loss = evaluation.Evaluator(config, model, mesh).evaluate(
      variables["params"], variables["batch_stats"])["loss"]

  no_dropout = S5Model.from_config(config.model, dropout=0.0)
  logits = no_dropout.apply({"params": variables["params"]}, batch["inputs"],
                          reset=batch["reset"], train=True, rngs={"dropout": jax.random.PRNGKey(5)})
  logits = np.asarray(logits, np.float64)
  log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                                 keepdims=True))
  log_probs -= logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
  expected = (nll * batch["mask"]).sum() / batch["mask"].sum()
  np.testing.assert_allclose(eval_loss, expected, rtol=1e-5)


def test_checkpoint_from_8_devices_evaluates_on_1(trained_text):
  flags = helpers.overrides(train__num_steps=2, model__dropout=0.2)
  result = helpers.run("evaluate", "text_small.py", trained_text, flags + ["--all"], devices=1)
  assert result.returncode == 0, result.stderr[-3000:]
  records = helpers.read_jsonl(trained_text / "eval" / "metrics.jsonl")
  assert [r["step"] for r in records] == [2]
  assert np.isfinite(records[0]["heldout/loss"]) and records[0]["heldout/bits_per_byte"] > 0


@pytest.mark.slow
def test_watch_mode_evaluates_each_checkpoint_once(tmp_path):
  flags = helpers.overrides(train__num_steps=8, checkpoint__every_steps=2, checkpoint__keep=10)
  watch_flags = flags + ["--watch", "--poll_seconds=0.2"]
  eval_log = tmp_path / "eval" / "metrics.jsonl"
  trainer = helpers.start("train", "text_small.py", tmp_path, flags)
  watcher = helpers.start("evaluate", "text_small.py", tmp_path, watch_flags)
  deadline = time.time() + 300
  while time.time() < deadline and not (eval_log.exists() and helpers.read_jsonl(eval_log)):
    assert watcher.poll() is None, watcher.stdout.read()[-3000:]
    time.sleep(0.1)
  watcher.kill()  # killed mid-run, after at least one finished step
  watcher.wait()
  done_before_restart = [r["step"] for r in helpers.read_jsonl(eval_log)]
  assert done_before_restart
  restarted = helpers.start("evaluate", "text_small.py", tmp_path, watch_flags)
  assert trainer.wait(timeout=600) == 0
  assert restarted.wait(timeout=600) == 0, restarted.stdout.read()[-3000:]
  steps_evaluated = [r["step"] for r in helpers.read_jsonl(eval_log)]
  assert sorted(steps_evaluated) == [2, 4, 6, 8], steps_evaluated  # each exactly once


def test_recurrent_logits_match_parallel_model():
  config = tiny_config()
  config.data.kind, config.model.vocab_size = "audio", 256
  model = S5Model.from_config(config.model)
  tokens = np.random.default_rng(0).integers(0, 256, (2, 40)).astype(np.int32)
  variables = model.init(jax.random.PRNGKey(0), tokens)
  parallel_logits = np.asarray(model.apply(variables, tokens))
  states, prefix_logits = model.apply(variables, tokens[:, :25], method=S5Model.prefill)
  np.testing.assert_allclose(prefix_logits, parallel_logits[:, :25], rtol=1e-4, atol=1e-4)
  for t in range(25, 40):
    states, step_logits = model.apply(variables, states, tokens[:, t], method=S5Model.step)
    np.testing.assert_allclose(step_logits, parallel_logits[:, t], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_generated_wav_reads_back(tmp_path):
  flags = helpers.overrides(train__num_steps=2, checkpoint__every_steps=2)
  result = helpers.run("train", "audio_small.py", tmp_path, flags)
  assert result.returncode == 0, result.stderr[-3000:]
  result = helpers.run("generate", "audio_small.py", tmp_path,
                    flags + ["--config.generate.length=800", "--config.generate.num_samples=2",
                             "--config.generate.top_p=0.9"])
  assert result.returncode == 0, result.stderr[-3000:]
  wavs = sorted(os.listdir(tmp_path / "samples"))
  assert wavs == ["step_2_sample_0.wav", "step_2_sample_1.wav"]
  for name in wavs:
    info = soundfile.info(tmp_path / "samples" / name)
    assert (info.samplerate, info.frames, info.channels) == (16000, 800, 1)
    waveform, _ = soundfile.read(tmp_path / "samples" / name)
    assert np.all(np.abs(waveform) <= 1.0) and np.std(waveform) > 0


def test_relative_workdir(tmp_path):
  """`make train` passes a relative workdir; every entry point must accept one."""
  flags = helpers.overrides(train__num_steps=2, checkpoint__every_steps=2)
  for module in ("train", "evaluate"):
    result = subprocess.run(helpers.command(module, "text_small.py", "relative_run", flags),
                            env=helpers.env_for(1), capture_output=True, text=True, cwd=tmp_path,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / "relative_run" / "checkpoints" / "2").is_dir()
  assert helpers.read_jsonl(tmp_path / "relative_run" / "eval" / "metrics.jsonl")[0]["step"] == 2
