"""Held-out bits per sample of one LM checkpoint scored with several context lengths, as a PNG.

  python tools/context_curve.py --config=configs/spoken_digits_lm.py \
      --workdir=workdirs/spoken_digits_lm [--step=N] --seq_lens=256,1024,4096,16000 \
      --output=docs/context_curve.png [--config.* overrides]

For each length the eval job's own evaluator (s5scale/evaluation.py) runs with eval.seq_len set to
it: the held-out clips are cut into consecutive windows of that length, each scored from a fresh
state, so every held-out sample is scored once at every length and only the context a prediction
can see changes. A curve that keeps falling with length shows the model uses long context. xz -9e
and gzip -9 on the same codes are drawn as dashed lines (they see whole windows too).

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
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from s5scale import cli, config_check, evaluation, inference, parallel

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


def plot(rows: list[dict], output: str, title: str) -> None:
  figure, axes = plt.subplots(figsize=(6.0, 4.0), dpi=100)
  lengths = [r["seq_len"] for r in rows]
  axes.plot(lengths, [r["bits_per_sample"] for r in rows], "o-", label="model")
  for name, color in (("xz", "tab:gray"), ("gzip", "tab:olive")):
    key = f"{name}_bits_per_sample"
    if all(key in r for r in rows):
      axes.plot(lengths, [r[key] for r in rows], "--", color=color, label=name)
  axes.set_xscale("log")
  axes.set_xticks(lengths, [f"{n:,}" for n in lengths])
  axes.set_xlabel("context (samples per scored window)")
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
  with open(output + ".jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  plot(rows, output, f"{os.path.basename(workdir.rstrip('/'))}, step {rows[0]['step']}")
  print(output)
  return 0

if __name__ == "__main__":
  cli.define_flags()
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("seq_lens", "256,1024,4096,16000", "Context lengths, comma-separated.")
  flags.DEFINE_string("output", "docs/context_curve.png", "PNG path (and <path>.jsonl).")
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
