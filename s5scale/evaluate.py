"""Evaluates held-out data on checkpoints:
`python -m s5scale.evaluate --config=... --workdir=DIR [--step=N | --all | --watch]`.

Restores parameters onto this job's own devices and mesh (one CPU device can evaluate a checkpoint
trained on many), appends one record per (step, split) to eval/metrics.jsonl and skips steps
already recorded there, so a restarted job does not redo work.

Zero-shot at another sample rate: `--config.data.sample_rate=8000 --config.data.seq_len=8000
--config.eval.step_rescale=2` on a 16 kHz model records split "heldout_step_rescale2", beside the
plain "heldout" records, so both are kept and neither is skipped as already done.
"""

import math
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from s5scale import baselines, checkpoint, cli, data, metrics, parallel, steps
from s5scale.nn.model import S5Model

SPLIT = "heldout"


def split_name(config) -> str:
  """"heldout", or "heldout_step_rescale<r>" for a zero-shot evaluation with eval.step_rescale=r."""
  rescale = config.eval.step_rescale
  return SPLIT if rescale == 1.0 else f"{SPLIT}_step_rescale{rescale:g}"


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

  def evaluate(self, params, batch_stats, split: str = SPLIT) -> dict:
    """split: "heldout", or "heldout/<name>" for one source of data.mixture."""
    data_config = self.config.data.copy_and_resolve_references().unlock()
    data_config.batch_size = self.config.eval.batch_size or data_config.batch_size
    data_config.seq_len = self.config.eval.seq_len or data_config.seq_len
    batches = data.make_iterator(data_config, split, process_index=jax.process_index(),
                                 process_count=jax.process_count(), num_epochs=1)
    totals, num_batches, start, scored = None, 0, time.time(), []
    for local_batch in batches:
      if self.config.eval.max_batches and num_batches >= self.config.eval.max_batches:
        break
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


def steps_to_evaluate(manager, workdir: str, only_step: int | None, split: str) -> list[int]:
  available = manager.all_steps()
  if only_step is not None:
    if only_step not in available:
      raise checkpoint.CheckpointError(
          f"--step={only_step}: no complete checkpoint; available steps {sorted(available)}")
    return [only_step]
  done = finished_steps(workdir, split)
  return [s for s in sorted(available) if s not in done]


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
  cli.check_config(config, jax.devices(), jax.process_count())
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
  final_step = config.train.num_steps
  while True:
    manager.reload()
    pending = steps_to_evaluate(manager, workdir, FLAGS.step, evaluator.split)
    for step in pending:
      checkpoint.check_architecture(manager, step, config.to_dict())
      variables = checkpoint.restore_subset(manager, step, abstract)
      evaluator.run(workdir, step, variables["params"], variables["batch_stats"])
    if not FLAGS.watch or final_step in finished_steps(workdir, evaluator.split):
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
