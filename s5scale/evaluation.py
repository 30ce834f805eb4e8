"""Held-out evaluation: the Evaluator (used inline by training too) and the eval job.

`python -m s5scale.evaluate` (s5scale/evaluate.py) runs `run_eval_job`. It follows the workdir's
checkpoints (s5scale/checkpoint_follower.py), restores parameters onto this job's own devices and
mesh (one CPU device can evaluate a checkpoint trained on many), appends one record per (step,
split) to eval/metrics.jsonl and skips steps already recorded there, so a restarted job does not
redo work.

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
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from s5scale import baselines, cli, config_check, config_files, data, inference, metrics
from s5scale import parallel, steps, storage
from s5scale.checkpoint_follower import CheckpointFollower
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
      model = S5Model.from_config(config.model, step_rescale=config.eval.step_rescale)
    self.model = model
    task = config.model.task
    self.eval_step = jax.jit(parallel.on_mesh(steps.make_eval_step(model, task), mesh))
    self.carried_eval_step = jax.jit(
        parallel.on_mesh(steps.make_carried_eval_step(model, task), mesh), donate_argnums=3)
    self.batch_statistics = jax.jit(parallel.on_mesh(steps.make_batch_statistics_step(model),
                                                     mesh))

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

  def evaluate_carried(self, params, batch_stats) -> dict:
    """The held-out items scored whole: each row streams one item as consecutive windows of
    eval.seq_len with every layer's state carried from window to window (data.carry_state's
    truncated BPTT, at evaluation), so a prediction sees all of its item before it."""
    data_config = eval_data_config(self.config)
    batches = data.carried_heldout_iterator(
        data_config, data_config.batch_size, data_config.seq_len,
        process_index=jax.process_index(), process_count=jax.process_count(),
        row_multiple=parallel.batch_ways(self.mesh))
    totals, stored, num_batches, start = None, None, 0, time.time()
    for local_batch in batches:
      if self.config.eval.max_batches and num_batches >= self.config.eval.max_batches:
        break
      batch = parallel.global_batch(local_batch, self.mesh)
      if stored is None:   # rows start at an item's first window: reset[:, 0] drops this state
        stored = self.zero_states(batch["inputs"].shape[0])
      sums, stored = self.carried_eval_step(params, batch_stats, batch, stored)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
      num_batches += 1
    if totals is None:
      raise data.DataError(f"the {SPLIT} split of data.source={self.config.data.source!r} is empty")
    return summarize(jax.device_get(totals), self.config, num_batches, time.time() - start)

  def zero_states(self, batch: int):
    """Stored zero states for `batch` rows, sharded like the carried training state."""
    boxed = steps.zero_carried_states(self.model, batch)
    return jax.device_put(boxed.unbox(), parallel.logical_shardings(boxed, self.mesh))

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
    The mixture's record is written last, so a step with it recorded is complete. With
    eval.carry_state, the first's record also holds "<split>_carried/..." (evaluate_carried), so
    one record compares the two scores of one checkpoint."""
    records = {}
    for split in data.heldout_splits(self.config.data):
      name = self.split + split[len(SPLIT):]      # e.g. heldout_step_rescale2/books
      records[name] = {f"{name}/{k}": v
                       for k, v in self.evaluate(params, batch_stats, split).items()}
    if self.config.eval.carry_state:
      records[self.split].update({f"{self.split}_carried/{k}": v for k, v in
                                  self.evaluate_carried(params, batch_stats).items()})
    with metrics.MetricsWriter(storage.join(workdir, "eval", "metrics.jsonl"),
                               storage.join(workdir, "tb", "eval")) as writer:
      for name, record in reversed(records.items()):
        writer.write(step, record, split=name, data=scored_data(self.config))
        logging.info("eval step %d %s: %s", step, name,
                     "  ".join(f"{k.removeprefix(name + '/')} {v:.4f}" for k, v in record.items()))
    prefix = self.split + "/"
    return {k[len(prefix):]: v for k, v in records[self.split].items() if k.startswith(prefix)}


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


def scored_data(config) -> dict:
  """What a record scored: the data keys that choose the held-out examples. A record is done
  for another eval only if both scored the same data."""
  return {key: config.data[key] for key in ("source", "mixture", "heldout_fraction",
                                            "heldout_source") if key in config.data}


def finished_steps(workdir: str, split: str, config) -> set[int]:
  """Steps with a record of `split` on config's data (a record from before records named their
  data scored the run's own, in its config.json)."""
  records = metrics.read_jsonl(storage.join(workdir, "eval", "metrics.jsonl"))
  saved = config_files.saved_run_config(workdir)
  unnamed = scored_data(config_files.load_run_config(workdir)) if saved else None
  wanted = scored_data(config)
  return {r["step"] for r in records
          if r.get("split") == split and r.get("data", unnamed) == wanted}


def record_skip(workdir: str, step: int, split: str, config, why: str) -> None:
  logging.warning("skipping checkpoint step %d (%s): %s", step, split, why)
  with metrics.MetricsWriter(storage.join(workdir, "eval", "metrics.jsonl"),
                             storage.join(workdir, "tb", "eval")) as writer:
    writer.write(step, {}, split=split, data=scored_data(config), skipped=why)


def exit_0_on_sigterm() -> threading.Event:
  """A --watch job has nothing to save: a SIGTERM (preemption, maintenance) ends it with exit 0,
  so its launcher relaunches it rather than count a failure; the next job skips the steps already
  recorded. Installed after jax.distributed, whose SIGTERM notifier it replaces.

  Returns the event the signal sets. The handler's SystemExit is lost when the signal lands in a
  garbage-collector callback (JAX has one) or a __del__, whose exceptions Python ignores, so the
  follower also ends the job at its next wait once the event is set.
  """
  received = threading.Event()

  def stop(signum, frame):
    del signum, frame
    received.set()
    logging.warning("SIGTERM: the eval job stops; relaunched, it goes on from its records")
    sys.exit(0)
  signal.signal(signal.SIGTERM, stop)
  return received


def run_eval_job(config, workdir: str, only_step: int | None = None, watch: bool = False,
                 poll_seconds: float = 10.0) -> int:
  """Evaluates every checkpoint of workdir not yet recorded for this split (or only_step);
  with `watch`, new ones as the trainer writes them, until its final step."""
  cli.setup_logging(workdir, "evaluate")
  parallel.initialize_distributed()
  stop = exit_0_on_sigterm() if watch else threading.Event()
  data.fill_num_classes(config)
  config_check.check_on_devices(config, jax.devices(), jax.process_count())
  mesh = parallel.make_mesh(config.mesh)
  model = S5Model.from_config(config.model)
  evaluator = Evaluator(config, model, mesh)
  sample = data.example_batch(config.data, config.data.batch_size)
  abstract = inference.abstract_variables(model, mesh, sample["inputs"])
  split = evaluator.split
  follower = CheckpointFollower(workdir, split, config, only_step=only_step, watch=watch,
                                poll_seconds=poll_seconds, stop=stop)
  for step, variables in follower.checkpoints(
      abstract, done=lambda: finished_steps(workdir, split, config),
      on_skip=lambda step, why: record_skip(workdir, step, split, config, why)):
    evaluator.run(workdir, step, variables["params"], variables.get("batch_stats", {}))
  return 0
