"""Recurrent-mode sampling of audio or text from a checkpoint (`python -m s5scale.generate`).

A prompt (text prefix or audio file) is processed with the parallel scan, in windows of
data.seq_len with the state carried from one to the next (any prompt length, memory of one
window); each new sample then costs one recurrent step, O(1) in the context length. Each run writes a new folder
samples/run_<N>/ (WAV or .txt samples, the prompt as the model saw it, settings.json) and
tensorboard (add_audio, add_text); an earlier run's folder is never written again.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from s5scale import cli, data, inference, storage
from s5scale.data import audio as audio_lib
from s5scale.nn.model import S5Model


def sample_token(logits, key, temperature: float, top_p: float):
  """Temperature and nucleus (top-p) sampling. logits (batch, V) -> tokens (batch,) int32."""
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest set whose mass reaches top_p (always at least the top token).
    cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def make_sampler(model, length: int, temperature: float, top_p: float,
                 prefill_window: int | None = None):
  """(variables, prompt (batch, Lp) int32, seed) -> sampled tokens (batch, length) int32.

  The prompt is read by the parallel scan in windows of prefill_window tokens (None: one window),
  each starting from the states the previous one ended with, so prefill memory depends on the
  window, not on the prompt's length; then one recurrent step per new token. The sampling RNG for
  new token k is fold_in(seed, k) (docs/design.md, "Determinism").
  """
  prefill_first = jax.jit(lambda variables, window: model.apply(variables, window,
                                                                method=S5Model.prefill))

  @jax.jit
  def prefill_next(variables, states, window):
    logits, states = model.apply(variables, window, states=states)
    return states, logits

  @jax.jit
  def decode(variables, states, last_logits, seed):
    base_key = jax.random.PRNGKey(seed)

    def one_step(carry, index):
      states, next_logits = carry
      token = sample_token(next_logits, jax.random.fold_in(base_key, index), temperature, top_p)
      states, next_logits = model.apply(variables, states, token, method=S5Model.step)
      return (states, next_logits), token

    _, tokens = jax.lax.scan(one_step, (states, last_logits), jnp.arange(length))
    return tokens.T

  def sample(variables, prompt, seed):
    window = prefill_window or prompt.shape[1]
    states, logits = prefill_first(variables, prompt[:, :window])
    for start in range(window, prompt.shape[1], window):
      states, logits = prefill_next(variables, states, prompt[:, start:start + window])
    return decode(variables, states, logits[:, -1], seed)

  return sample


def prompt_tokens(data_config, prompt: str, batch: int) -> np.ndarray:
  """(batch, Lp) int32; with no prompt, a BOS (text) or one sample of silence (audio)."""
  tokens = data.encode_prompt(data_config, prompt)
  if tokens.size == 0:
    tokens = np.array([audio_lib.silence_code(data_config.quantization, data_config.bits)],
                      np.int32)
  return np.tile(tokens[None], (batch, 1))


def write_samples(workdir: str, step: int, data_config, tokens: np.ndarray, writer,
                  subdir: str = "") -> list[str]:
  """One WAV or .txt per row into workdir/samples[/subdir]; writer (or None): tensorboard."""
  out_dir = storage.join(workdir, "samples", subdir)
  paths = []
  for index, row in enumerate(tokens):
    decoded = data.decode_tokens(data_config, row)
    if data_config.kind == "audio":
      path = storage.join(out_dir, f"step_{step}_sample_{index}.wav")
      storage.write_wav(path, np.asarray(decoded, np.float32), data_config.sample_rate)
      if writer:
        writer.add_audio(f"samples/{index}", np.asarray(decoded, np.float32), step,
                         sample_rate=data_config.sample_rate)
    else:
      path = storage.join(out_dir, f"step_{step}_sample_{index}.txt")
      storage.write_text(path, decoded)
      if writer:
        writer.add_text(f"samples/{index}", decoded, step)
    paths.append(path)
  return paths


def read_prompt(data_config, prompt: str) -> tuple[str, str]:
  """The prompt, and where it came from ("none", "inline" or "file:<path>").

  A text prompt "@path" is the contents of that file (UTF-8, taken exactly, newlines included),
  so a long or multi-line prompt needs no shell quoting. An audio prompt is always a file path,
  read later by data.encode_prompt.
  """
  if not prompt:
    return prompt, "none"
  if data_config.kind != "text":
    return prompt, f"file:{cli.workdir_path(prompt)}"
  if not prompt.startswith("@"):
    return prompt, "inline"
  path = prompt[1:]
  try:
    return storage.path(path).read_text(encoding="utf-8"), f"file:{cli.workdir_path(path)}"
  except (OSError, UnicodeDecodeError) as error:
    reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
    raise cli.ConfigError(f"prompt file {path} (from --config.generate.prompt=@{path}) cannot "
                          f"be read: {reason}") from None


def new_run_dir(workdir: str) -> str:
  """workdir/samples/run_<N>, N one above the largest existing run number (storage.make_numbered_dir)."""
  return storage.make_numbered_dir(storage.join(workdir, "samples"), "run_")


def write_prompt(run_dir: str, data_config, prompt: np.ndarray, given: bool) -> None:
  """prompt.txt (text: always, the decoded prompt tokens) or prompt.wav (audio, if given)."""
  decoded = data.decode_tokens(data_config, prompt)
  if data_config.kind == "text":
    storage.write_text(storage.join(run_dir, "prompt.txt"), decoded)
  elif given:
    storage.write_wav(storage.join(run_dir, "prompt.wav"), np.asarray(decoded, np.float32),
                      data_config.sample_rate)


def generate(config, workdir: str, step: int | None) -> int:
  """Writes generate.num_samples samples of `step` (default: the latest) to a new
  workdir/samples/run_<N>/, beside the prompt and the settings that made them."""
  if config.model.task != "lm" or config.model.bidirectional:
    raise cli.ConfigError("generation needs model.task='lm' and model.bidirectional=False")
  cli.setup_logging(workdir, "generate")
  settings = config.generate
  prompt_text, prompt_source = read_prompt(config.data, settings.prompt)  # fails before restoring
  model, variables, step, _ = inference.restore_model(workdir, config, step)
  prompt = prompt_tokens(config.data, prompt_text, settings.num_samples)
  sampler = make_sampler(model, settings.length, settings.temperature, settings.top_p,
                         prefill_window=config.data.seq_len)
  logging.info("sampling %d x %d tokens from step %d (prompt %d tokens)", settings.num_samples,
               settings.length, step, prompt.shape[1])
  tokens = np.asarray(sampler(variables, prompt, settings.seed))
  run_dir = new_run_dir(workdir)
  write_prompt(run_dir, config.data, prompt[0], bool(prompt_text))
  storage.write_text(storage.join(run_dir, "settings.json"), json.dumps(
      {"step": step, "temperature": settings.temperature, "top_p": settings.top_p,
       "seed": settings.seed, "length": settings.length, "num_samples": settings.num_samples,
       "prompt_source": prompt_source}, indent=2))
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  writer = SummaryWriter(storage.join(workdir, "tb", "samples"))
  paths = write_samples(workdir, step, config.data, tokens, writer,
                        subdir=storage.path(run_dir).name)
  writer.close()
  logging.info("wrote run folder %s: %s", run_dir, ", ".join(storage.path(p).name for p in paths))
  return 0
