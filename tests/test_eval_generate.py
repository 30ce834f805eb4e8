"""The eval job and sampling. Oracles: a float64 NumPy cross-entropy of the training-
mode forward pass, the parallel model's logits, files on disk (bytes before and after, a prompt
written by hand) and a training process running beside the eval job."""

import json
import subprocess
import time

import jax
import numpy as np
import pytest
import soundfile

from s5scale import checkpoint, data, evaluation, inference, parallel, sampling
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
def test_generated_wav_reads_back_beside_its_prompt(tmp_path):
  flags = helpers.overrides(train__num_steps=2, checkpoint__every_steps=2)
  result = helpers.run("train", "audio_small.py", tmp_path, flags)
  assert result.returncode == 0, result.stderr[-3000:]
  time = np.arange(1600) / 16000
  tone = np.sin(2 * np.pi * 440 * time)
  soundfile.write(tmp_path / "prompt_in.wav", tone, 16000, subtype="FLOAT")
  result = helpers.run("generate", "audio_small.py", tmp_path,
                    flags + ["--config.generate.length=800", "--config.generate.num_samples=2",
                             "--config.generate.top_p=0.9",
                             f"--config.generate.prompt={tmp_path / 'prompt_in.wav'}"])
  assert result.returncode == 0, result.stderr[-3000:]
  run = tmp_path / "samples" / "run_1"
  wavs = sorted(p.name for p in run.glob("step_*"))
  assert wavs == ["step_2_sample_0.wav", "step_2_sample_1.wav"]
  for name in wavs:
    info = soundfile.info(run / name)
    assert (info.samplerate, info.frames, info.channels) == (16000, 800, 1)
    waveform, _ = soundfile.read(run / name)
    assert np.all(np.abs(waveform) <= 1.0) and np.std(waveform) > 0
  # The prompt as the model saw it: the peak-normalised tone, through 8-bit quantization.
  prompt, rate = soundfile.read(run / "prompt.wav")
  assert rate == 16000 and prompt.shape == tone.shape
  np.testing.assert_allclose(prompt, tone / np.abs(tone).max(), atol=0.05)
  settings = json.loads((run / "settings.json").read_text())
  assert settings["prompt_source"] == f"file:{tmp_path / 'prompt_in.wav'}"


def _run_folder(run):
  """name -> bytes of every file in a samples/run_<N> folder."""
  return {p.name: p.read_bytes() for p in sorted(run.iterdir())}


def test_generate_writes_a_new_run_folder_each_time_with_its_prompt(trained_text, tmp_path):
  flags = helpers.overrides(train__num_steps=2, model__dropout=0.2) + [
      "--config.generate.length=12", "--config.generate.num_samples=2",
      "--config.generate.temperature=0.7", "--config.generate.seed=5"]
  samples = trained_text / "samples"
  result = helpers.run("generate", "text_small.py", trained_text,
                       flags + ["--config.generate.prompt=def main("])
  assert result.returncode == 0, result.stderr[-3000:]
  first = _run_folder(samples / "run_1")
  assert sorted(first) == ["prompt.txt", "settings.json", "step_2_sample_0.txt",
                           "step_2_sample_1.txt"]
  assert first["prompt.txt"].decode() == "def main("
  assert json.loads(first["settings.json"]) == {
      "step": 2, "temperature": 0.7, "top_p": 1.0, "seed": 5, "length": 12, "num_samples": 2,
      "prompt_source": "inline"}
  assert str(samples / "run_1") in result.stderr            # the folder is logged

  # A prompt read from a file, newlines and all; a second run never touches the first.
  prompt = "import os\nimport sys\n\n\ndef main(argv):\n  del argv\n"
  (tmp_path / "prompt.py").write_text(prompt)
  result = helpers.run("generate", "text_small.py", trained_text,
                       flags + [f"--config.generate.prompt=@{tmp_path / 'prompt.py'}"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert _run_folder(samples / "run_1") == first
  second = _run_folder(samples / "run_2")
  assert second["prompt.txt"].decode() == prompt
  assert json.loads(second["settings.json"])["prompt_source"] == f"file:{tmp_path / 'prompt.py'}"
  for index in range(2):
    # The samples are the continuation only: 12 new bytes, shorter than the prompt.
    sample = second[f"step_2_sample_{index}.txt"].decode()
    assert len(sample) <= 12 < len(prompt)

  missing = tmp_path / "no_such_prompt.txt"
  result = helpers.run("generate", "text_small.py", trained_text,
                       flags + [f"--config.generate.prompt=@{missing}"])
  assert result.returncode == 2, result.stderr[-3000:]
  assert str(missing) in result.stderr and "Traceback" not in result.stderr
  assert sorted(p.name for p in samples.iterdir()) == ["run_1", "run_2"]


def test_run_numbers_continue_above_the_largest_and_are_never_reused(tmp_path):
  for name in ("run_2", "run_9", "run_x", "quality"):
    (tmp_path / "samples" / name).mkdir(parents=True)
  (tmp_path / "samples" / "run_12").write_text("a file, not a run, but its number is taken")
  assert sampling.new_run_dir(str(tmp_path)) == str(tmp_path / "samples" / "run_13")
  assert sampling.new_run_dir(str(tmp_path)) == str(tmp_path / "samples" / "run_14")


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
