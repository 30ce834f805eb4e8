"""Evaluates held-out data on checkpoints:
`python -m s5scale.evaluate --config=... --workdir=DIR [--step=N | --all | --watch]`.

Restores parameters onto this job's own devices and mesh (one CPU device can evaluate a checkpoint
trained on many), appends one record per (step, split) to eval/metrics.jsonl and skips steps
already recorded there, so a restarted job does not redo work.

Zero-shot at another sample rate: `--config.data.sample_rate=8000 --config.data.seq_len=8000
--config.eval.step_rescale=2` on a 16 kHz model records split "heldout_step_rescale2", beside the
plain "heldout" records, so both are kept and neither is skipped as already done.

Two diagnostics get their own split names the same way: `--config.eval.recompute_batch_stats=N`
("heldout_recomputed_bn<N>": BatchNorm statistics recomputed on N training batches before
scoring, s5scale/steps.py) and `--config.eval.lowpass_hz=F` ("heldout_lowpass<F>": held-out clips
band-limited at F Hz, to tell a classifier that needs the energy above F from one that fails at
another Δ).
"""

import itertools
import math
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from s5scale import baselines, checkpoint, cli, data, metrics, parallel, steps, validate
from s5scale.data import audio as audio_lib
from s5scale.nn.model import S5Model

SPLIT = "heldout"


def split_name(config) -> str:
  """"heldout", or "heldout_step_rescale<r>" for a zero-shot evaluation with eval.step_rescale=r;
  "_recomputed_bn<N>" and "_lowpass<F>" mark the diagnostics (module docstring)."""
  name, settings = SPLIT, config.eval
  if settings.step_rescale != 1.0:
    name += f"_step_rescale{settings.step_rescale:g}"
  if settings.recompute_batch_stats and config.model.norm == "batch":
    name += f"_recomputed_bn{settings.recompute_batch_stats}"
  if settings.lowpass_hz:
    name += f"_lowpass{settings.lowpass_hz:g}"
  return name


def eval_data_config(config):
  """config.data as the eval job reads it: eval.batch_size and eval.seq_len where they are set."""
  data_config = config.data.copy_and_resolve_references().unlock()
  data_config.batch_size = config.eval.batch_size or data_config.batch_size
  data_config.seq_len = config.eval.seq_len or data_config.seq_len
  return data_config


class Evaluator:
  """Held-out metrics for given parameters; the same path serves inline and standalone eval."""

  def __init__(self, config, model, mesh):
    self.config, self.mesh, self.split = config, mesh, split_name(config)
    # eval.step_rescale evaluates at another sample rate with no retraining (Δ scales with it).
    if config.eval.step_rescale != 1.0:
      kwargs = cli.model_kwargs(config.model)
      kwargs["ssm_kwargs"]["step_rescale"] *= config.eval.step_rescale
      model = S5Model(**kwargs)
    self.model = model
    eval_step = steps.make_eval_step(model, config.model.task)

    def eval_step_on_mesh(params, batch_stats, batch):
      with parallel.logical_constraints(mesh):
        return eval_step(params, batch_stats, batch)

    self.eval_step = jax.jit(eval_step_on_mesh)
    batch_statistics = steps.make_batch_statistics_step(model)

    def batch_statistics_on_mesh(params, batch_stats, batch):
      with parallel.logical_constraints(mesh):
        return batch_statistics(params, batch_stats, batch)

    self.batch_statistics = jax.jit(batch_statistics_on_mesh)

  def recomputed_batch_stats(self, params, batch_stats):
    """BatchNorm statistics recomputed on the first eval.recompute_batch_stats training batches
    (deterministic: the train stream's first batches), or batch_stats as saved."""
    num_batches = self.config.eval.recompute_batch_stats
    if not (num_batches and batch_stats):
      return batch_stats
    train_batches = data.make_iterator(self.config.data, "train", process_index=jax.process_index(),
                                       process_count=jax.process_count())
    batches = (parallel.global_batch(b, self.mesh)
               for b in itertools.islice(train_batches, num_batches))
    return steps.recompute_batch_stats(self.batch_statistics, params, batch_stats, batches)

  def lowpass(self, local_batch: dict) -> dict:
    if not self.config.eval.lowpass_hz:
      return local_batch
    inputs = audio_lib.band_limit(local_batch["inputs"], self.config.data.sample_rate,
                                  self.config.eval.lowpass_hz, axis=1)
    return {**local_batch, "inputs": inputs * local_batch["mask"][..., None]}

  def evaluate(self, params, batch_stats, split: str = SPLIT) -> dict:
    """split: "heldout", or "heldout/<name>" for one source of data.mixture."""
    data_config = eval_data_config(self.config)
    batches = data.make_iterator(data_config, split, process_index=jax.process_index(),
                                 process_count=jax.process_count(), num_epochs=1)
    totals, num_batches, start, scored = None, 0, time.time(), []
    batch_stats = self.recomputed_batch_stats(params, batch_stats)
    for local_batch in batches:
      if self.config.eval.max_batches and num_batches >= self.config.eval.max_batches:
        break
      local_batch = self.lowpass(local_batch)
      sums = self.eval_step(params, batch_stats, parallel.global_batch(local_batch, self.mesh))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
      num_batches += 1
      if self.config.eval.compressor_baselines and self.config.model.task == "lm":
        scored.append(baselines.scored_symbols(local_batch))
    if totals is None:
      raise data.DataError(f"the {SPLIT} split of data.source={self.config.data.source!r} is empty")
    results = summarize(jax.device_get(totals), self.config, num_batches, time.time() - start)
    if scored:
      results.update(self.compressor_results(np.concatenate(scored)))
    return results

  def compressor_results(self, symbols) -> dict:
    """xz / gzip on this process's scored held-out symbols, in the model's unit."""
    if self.config.data.kind == "text":
      payload = data.decode_tokens(self.config.data, symbols).encode("utf-8")
      bits = baselines.compressed_bits_per_symbol(payload, len(payload))
      return {f"{name}_bits_per_byte": value for name, value in bits.items()}
    if self.config.data.bits != 8:
      return {}  # the compressors see bytes; only 8-bit codes map one-to-one
    bits = baselines.compressed_bits_per_symbol(symbols.astype(np.uint8).tobytes(), len(symbols))
    return {f"{name}_bits_per_sample": value for name, value in bits.items()}

  def run(self, workdir: str, step: int, params, batch_stats) -> dict:
    """Evaluates every held-out split (a mixture's, then each source's); returns the first's.
    The mixture's record is written last, so a step with it recorded is complete."""
    all_results = {}
    for split in data.heldout_splits(self.config.data):
      name = self.split + split[len(SPLIT):]      # e.g. heldout_step_rescale2/books
      all_results[name] = self.evaluate(params, batch_stats, split)
    writer = metrics.MetricsWriter(os.path.join(workdir, "eval", "metrics.jsonl"),
                                   os.path.join(workdir, "tb", "eval"))
    for name, results in reversed(all_results.items()):
      writer.write(step, {f"{name}/{k}": v for k, v in results.items()}, split=name)
      logging.info("eval step %d %s: %s", step, name,
                   "  ".join(f"{k} {v:.4f}" for k, v in results.items()))
    writer.close()
    return all_results[self.split]


def summarize(totals: dict, config, num_batches: int, seconds: float) -> dict:
  """Loss in nats, plus bits per byte (text), bits per sample (audio LM) or accuracy."""
  weight = max(float(totals["weight_sum"]), 1.0)
  results = {"loss": float(totals["nll_sum"]) / weight}
  if config.model.task == "classify":
    results["accuracy"] = float(totals["correct_sum"]) / weight
  elif config.data.kind == "text":
    results["bits_per_byte"] = float(totals["nll_sum"]) / math.log(2) / max(
        float(totals["byte_sum"]), 1.0)
    # The UTF-8 bytes scored: equal for two tokenizers means their bits per byte compare.
    results["num_bytes"] = int(totals["byte_sum"])
  else:
    results["bits_per_sample"] = results["loss"] / math.log(2)
  results.update(num_predictions=weight, num_batches=num_batches, eval_seconds=seconds)
  return results


def finished_steps(workdir: str, split: str) -> set[int]:
  records = metrics.read_jsonl(os.path.join(workdir, "eval", "metrics.jsonl"))
  return {r["step"] for r in records if r.get("split") == split}


def abstract_eval_variables(model, config, mesh, sample_inputs) -> dict:
  """Shapes and target shardings of params and BatchNorm statistics on this job's mesh."""
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), sample_inputs))
  abstract = parallel.with_shardings(nn.unbox(variables),
                                     parallel.logical_shardings(variables, mesh))
  return {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}


def steps_to_evaluate(available: list[int], workdir: str, only_step: int | None,
                      split: str) -> list[int]:
  if only_step is not None:
    if only_step not in available:
      raise checkpoint.CheckpointError(
          f"--step={only_step}: no complete checkpoint; available steps {sorted(available)}")
    return [only_step]
  done = finished_steps(workdir, split)
  return [s for s in sorted(available) if s not in done]


class StepSkipped(Exception):
  """A step the trainer deleted, or had not finished, while it was read: skipped, not fatal."""


def list_steps(manager, attempts: int = 3) -> list[int]:
  """The complete steps on disk; a listing that fails because the trainer is deleting a step is
  retried, and after `attempts` this poll sees none."""
  for attempt in range(attempts):
    try:
      manager.reload()
      return sorted(manager.all_steps())
    except Exception as error:  # pylint: disable=broad-except  (orbax: many types for a vanished step)
      logging.warning("listing %s failed while the trainer changed it (%s: %s); attempt %d of %d",
                      manager.directory, type(error).__name__, str(error)[:200], attempt + 1,
                      attempts)
      time.sleep(1.0)
  return []


def why_unusable(manager, step: int, error: Exception | None = None) -> str | None:
  missing = checkpoint.missing_parts(manager.directory, step)
  if missing == ["the whole step"]:
    return "deleted by checkpoint rotation after this job listed it"
  if missing:
    return f"incomplete: {', '.join(missing)} missing"
  if error is not None:
    return f"unreadable: {type(error).__name__}: {str(error)[:300]}"
  return None


def wait_until_complete(manager, step: int, attempts: int = 5, pause_s: float = 0.5) -> None:
  """StepSkipped unless `step` is (or soon becomes) complete on disk. A step just renamed into
  place can still be getting its step metadata; one being deleted loses its parts one by one."""
  for _ in range(attempts):
    why = why_unusable(manager, step)
    if why is None:
      return
    if why.startswith("deleted"):
      break
    time.sleep(pause_s)
  raise StepSkipped(why)


def read_step(manager, step: int, abstract: dict, config_dict: dict) -> tuple[dict, dict]:
  """(params and batch_stats, the trainer's saved config) of `step`; StepSkipped if the step is
  gone, incomplete or unreadable. An incompatible architecture is CheckpointError (exit 2)."""
  wait_until_complete(manager, step)
  try:
    saved = checkpoint.saved_config(manager, step)
  except Exception as error:  # pylint: disable=broad-except
    raise StepSkipped(why_unusable(manager, step, error)) from None
  checkpoint.check_architecture(manager, step, config_dict, saved)
  wait_until_complete(manager, step)  # again: a failed restore mid-deletion is noisy in orbax
  try:
    return checkpoint.restore_subset(manager, step, abstract), saved
  except Exception as error:  # pylint: disable=broad-except
    raise StepSkipped(why_unusable(manager, step, error)) from None


class MissedSteps:
  """Counts saved steps that rotation deleted before this --watch job saw them."""

  def __init__(self, checkpoint_config):
    self.every_steps, self.keep = checkpoint_config.every_steps, checkpoint_config.keep
    self.seen, self.reported = set(), 0

  def update(self, available: list[int], done: set[int], trainer_config: dict | None) -> None:
    if trainer_config:  # the trainer's own values, if its command line changed them
      self.every_steps = trainer_config["checkpoint"]["every_steps"]
      self.keep = trainer_config["checkpoint"]["keep"]
    self.seen |= set(available)
    newest = max(self.seen, default=0)
    saved = set(range(self.every_steps, newest + 1, self.every_steps))
    missed = sorted(saved - self.seen - done)
    if len(missed) > self.reported:
      self.reported = len(missed)
      logging.warning(
          "missed %d checkpoint step(s) so far (the latest: %s): the trainer's rotation deleted "
          "them before this job saw them. Raise checkpoint.keep (now %d) in the trainer's "
          "config, or evaluate faster (--poll_seconds, eval.max_batches).", len(missed),
          missed[-5:], self.keep)


def record_skip(workdir: str, step: int, split: str, why: str) -> None:
  logging.warning("skipping checkpoint step %d (%s): %s", step, split, why)
  writer = metrics.MetricsWriter(os.path.join(workdir, "eval", "metrics.jsonl"),
                                 os.path.join(workdir, "tb", "eval"))
  writer.write(step, {}, split=split, skipped=why)
  writer.close()


def main(argv) -> int:
  del argv
  config, workdir = FLAGS.config, cli.workdir_path(FLAGS.workdir)
  try:
    return run_eval_job(config, workdir)
  except (cli.ConfigError, data.DataError, checkpoint.CheckpointError) as error:
    logging.error("%s: %s", type(error).__name__, error)
    return cli.EXIT_BAD_INPUT


def run_eval_job(config, workdir: str) -> int:
  cli.setup_logging(workdir, "evaluate")
  parallel.initialize_distributed()
  cli.fill_num_classes(config)
  validate.check_on_devices(config, jax.devices(), jax.process_count())
  mesh = parallel.make_mesh(config.mesh)
  model = S5Model(**cli.model_kwargs(config.model))
  evaluator = Evaluator(config, model, mesh)
  sample = data.example_batch(config.data, config.data.batch_size)
  abstract = abstract_eval_variables(model, config, mesh, sample["inputs"])
  while FLAGS.watch and not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
    time.sleep(FLAGS.poll_seconds)  # started before the training job wrote anything
  if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
    raise checkpoint.CheckpointError(f"no checkpoints in {workdir}")
  manager = checkpoint.open_readonly(workdir)
  split, final_step = evaluator.split, config.train.num_steps
  missed, trainer_config = MissedSteps(config.checkpoint), None
  while True:
    available = list_steps(manager)
    pending = steps_to_evaluate(available, workdir, FLAGS.step, split)
    for index, step in enumerate(pending):
      checkpoint.pin_steps(workdir, split, pending[index:])  # the trainer keeps pinned steps
      try:
        variables, trainer_config = read_step(manager, step, abstract, config.to_dict())
      except StepSkipped as skip:
        record_skip(workdir, step, split, str(skip))
        if FLAGS.step is not None:
          raise checkpoint.CheckpointError(f"checkpoint step {step} skipped: {skip}") from None
        continue
      finally:
        if step == pending[-1]:
          checkpoint.pin_steps(workdir, split, [])
      evaluator.run(workdir, step, variables["params"], variables["batch_stats"])
    done = finished_steps(workdir, split)
    if FLAGS.watch:
      missed.update(available, done, trainer_config)
    if not FLAGS.watch or final_step in done:
      break
    time.sleep(FLAGS.poll_seconds)
  if not (pending or FLAGS.watch) and FLAGS.step is None:
    logging.info("every checkpoint in %s is already evaluated", manager.directory)
  return 0


FLAGS = flags.FLAGS

if __name__ == "__main__":
  cli.define_flags()
  flags.DEFINE_integer("step", None, "Evaluate this checkpoint step only.")
  flags.DEFINE_bool("all", False, "Evaluate every checkpoint not yet evaluated (the default).")
  flags.DEFINE_bool("watch", False, "Poll for new checkpoints; exit after the final training step.")
  flags.DEFINE_float("poll_seconds", 10.0, "Polling interval for --watch.")
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
