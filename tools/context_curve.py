"""Held-out bits per sample of one LM checkpoint scored with several context lengths, as a PNG.

  python tools/context_curve.py --config=configs/spoken_digits_lm.py \
      --workdir=workdirs/spoken_digits_lm [--step=N] --seq_lens=256,1024,4096,16000 \
      --output=docs/context_curve.png [--config.* overrides]

For each length the eval job's own evaluator (s5scale/evaluation.py) runs with eval.seq_len set to
it: the held-out clips are cut into consecutive windows of that length, each scored from a fresh
state, so every held-out sample is scored once at every length and only the context a prediction
can see changes. A curve that keeps falling with length shows the model uses long context. xz -9e
and gzip -9 on the same codes are drawn as dashed lines (they see whole windows too).

--carried adds the curve to the whole recording: every held-out recording is streamed once in
windows of eval.seq_len with each layer's state carried from window to window (as evaluate's
eval.carry_state scores it), and each sample's bits are binned by its position in the recording,
the context it was predicted from: [0, 256), [256, 512), ... up to the longest recording.

Prints one JSON line per length ({"seq_len", "bits_per_sample", "xz_bits_per_sample", ...}) and
writes them beside the PNG as <output>.jsonl. Exit 2: bad config or no checkpoint.
"""

import json
import os
import sys
import time

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import matplotlib
matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt
import numpy as np
import optax
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from s5scale import cli, config_check, data, evaluation, inference, parallel, steps

FLAGS = flags.FLAGS


def context_curve(config, workdir: str, step: int | None, seq_lens: list[int]) -> list[dict]:
  """[{seq_len, step, bits_per_sample, <compressor>_bits_per_sample, ...}] for one checkpoint."""
  if config.model.task != "lm" or config.data.kind != "audio":
    raise cli.ConfigError("--config must be an audio LM (model.task='lm', data.kind='audio')")
  config_check.check_on_devices(config, jax.devices(), jax.process_count())
  mesh = parallel.make_mesh(config.mesh)
  model, variables, step, _ = inference.restore_model(workdir, config, step, mesh)
  rows = []
  batch_size = evaluation.eval_data_config(config).batch_size
  for seq_len in seq_lens:
    length_config = config.copy_and_resolve_references()
    length_config.eval.seq_len = seq_len
    if not config.eval.max_batches:
      # About as many samples per batch at every length: short windows would otherwise take
      # thousands of small steps. Windows are scored independently, so only the speed changes.
      length_config.eval.batch_size = batch_size * max(1, max(seq_lens) // seq_len)
    start = time.time()
    results = evaluation.Evaluator(length_config, model, mesh).evaluate(
        variables["params"], variables.get("batch_stats", {}))
    row = {"seq_len": seq_len, "step": step, "wall_s": time.time() - start, **results}
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


def carried_curve(config, workdir: str, step: int | None) -> list[dict]:
  """[{context, step, bits_per_sample, num_samples}]: held-out recordings streamed whole in
  windows of eval.seq_len with the state carried (evaluation.Evaluator.evaluate_carried's
  stream), each sample's bits binned by its position in its recording, i.e. by the context it
  had: [0, 256), [256, 512), [512, 1024), ... up to the longest recording."""
  mesh = parallel.make_mesh(config.mesh)
  model, variables, step, _ = inference.restore_model(workdir, config, step, mesh)
  data_config = evaluation.eval_data_config(config)
  evaluator = evaluation.Evaluator(config, model, mesh)
  batch_stats = variables.get("batch_stats", {})

  def nll_and_states(batch, stored):
    (logits, final), _ = steps.forward(model, variables["params"], batch_stats, batch,
                                       train=False, states=steps.model_states(stored))
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return nll * batch["mask"], steps.stored_states(final)

  nll_and_states = jax.jit(parallel.on_mesh(nll_and_states, mesh))

  sums, counts = np.zeros(64), np.zeros(64)
  stored, offsets, start = None, None, time.time()
  for local_batch in data.carried_heldout_iterator(data_config, data_config.batch_size,
                                                   data_config.seq_len,
                                                   row_multiple=parallel.batch_ways(mesh)):
    batch = parallel.global_batch(local_batch, mesh)
    if stored is None:
      stored = evaluator.zero_states(local_batch["inputs"].shape[0])
      offsets = np.zeros(local_batch["inputs"].shape[0], np.int64)
    nll, stored = nll_and_states(batch, stored)
    # A row whose window starts an item counts positions from 0 again.
    offsets = np.where(local_batch["reset"][:, 0], 0, offsets)
    positions = offsets[:, None] + np.arange(local_batch["inputs"].shape[1])
    bins = np.maximum(np.floor(np.log2(np.maximum(positions, 1) / 256)).astype(int) + 1, 0)
    np.add.at(sums, bins, np.asarray(nll))
    np.add.at(counts, bins, local_batch["mask"])
    offsets += local_batch["inputs"].shape[1]
  rows = []
  for index in np.flatnonzero(counts):
    # context: the bin's upper edge.
    row = {"context": 256 * 2**int(index), "step": step, "num_samples": int(counts[index]),
           "bits_per_sample": sums[index] / counts[index] / np.log(2),
           "wall_s": time.time() - start}
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


def plot(rows: list[dict], output: str, title: str, carried: list[dict] = ()) -> None:
  figure, axes = plt.subplots(figsize=(6.0, 4.0), dpi=100)
  lengths = [r["seq_len"] for r in rows]
  axes.plot(lengths, [r["bits_per_sample"] for r in rows], "o-", label="model, fresh windows")
  if carried:
    axes.plot([r["context"] for r in carried], [r["bits_per_sample"] for r in carried], "s-",
              color="tab:red", label="model, state carried (x: samples before it)")
  for name, color in (("xz", "tab:gray"), ("gzip", "tab:olive")):
    key = f"{name}_bits_per_sample"
    if all(key in r for r in rows):
      axes.plot(lengths, [r[key] for r in rows], "--", color=color, label=name)
  axes.set_xscale("log")
  # The carried bins' edges when there are any: they cover the fresh lengths' range.
  ticks = [r["context"] for r in carried] or lengths
  axes.set_xticks(ticks, [f"{n:,}" for n in ticks], rotation=45 if carried else 0)
  axes.set_xlabel("context (samples per fresh window; samples heard, carried)")
  axes.set_ylabel("held-out bits/sample")
  axes.set_title(title)
  axes.legend()
  figure.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  figure.savefig(output)
  plt.close(figure)


def main(argv) -> int:
  del argv
  try:
    seq_lens = [int(n) for n in FLAGS.seq_lens.split(",")]
    if not seq_lens or min(seq_lens) < 1:
      raise ValueError
  except ValueError:
    logging.error("--seq_lens=%r: expected comma-separated positive integers", FLAGS.seq_lens)
    return cli.EXIT_BAD_INPUT
  return cli.exit_code(write_curve, FLAGS.config, cli.workdir_path(FLAGS.workdir), FLAGS.step,
                       seq_lens, FLAGS.output)


def write_curve(config, workdir: str, step: int | None, seq_lens: list[int], output: str) -> int:
  rows = context_curve(config, workdir, step, seq_lens)
  carried = carried_curve(config, workdir, step) if FLAGS.carried else []
  with open(output + ".jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows + carried)
  plot(rows, output, f"{os.path.basename(workdir.rstrip('/'))}, step {rows[0]['step']}",
       carried)
  print(output)
  return 0

if __name__ == "__main__":
  cli.define_flags()
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("seq_lens", "256,1024,4096,16000", "Context lengths, comma-separated.")
  flags.DEFINE_string("output", "docs/context_curve.png", "PNG path (and <path>.jsonl).")
  flags.DEFINE_bool("carried", False, "Also stream each held-out recording whole with the state "
                    "carried across windows of eval.seq_len, and plot bits/sample by position "
                    "in the recording, up to its whole length.")
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
