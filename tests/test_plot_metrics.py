"""tools/plot_metrics.py on hand-written workdirs: the curves it extracts are the numbers written,
and the command writes a PNG of the stated pixel size (6 x 4 inches at 100 dpi per panel)."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.image  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "plot_metrics.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _import_tool():
  spec = importlib.util.spec_from_file_location("plot_metrics", TOOL)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


plot_metrics = _import_tool()


def _run_tool(*args):
  return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                        timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _write_jsonl(path, records):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(record) + "\n" for record in records))


def _make_workdir(path, *, kind, task="lm", tokenizer="bytes", train, evals=()):
  """train: [(step, loss)]; evals: [(step, split, {metric: value})], as the writers lay them out."""
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps(
      {"model": {"task": task}, "data": {"kind": kind, "tokenizer": tokenizer, "task": task}}))
  _write_jsonl(path / "metrics.jsonl",
               [{"step": step, "loss": loss, "learning_rate": 1e-3, "grad_norm": 1.0}
                for step, loss in train])
  _write_jsonl(path / "eval" / "metrics.jsonl",
               [{"step": step, **{f"{split}/{k}": v for k, v in results.items()},
                 "split": split} for step, split, results in evals])
  return path


TEXT_TRAIN = [(10, 5.0), (20, 4.0), (30, "nan"), (40, 3.0), (30, 3.5)]  # 30 again: a resume
TEXT_EVALS = [
    (20, "heldout", {"loss": 3.9, "bits_per_byte": 5.6, "xz_bits_per_byte": 2.25,
                     "gzip_bits_per_byte": 2.5, "num_batches": 4}),
    (40, "heldout", {"loss": 2.9, "bits_per_byte": 4.2, "xz_bits_per_byte": 2.0,
                     "gzip_bits_per_byte": 2.75, "num_batches": 4}),
    (40, "heldout_step_rescale2", {"loss": 3.1, "bits_per_byte": 4.5}),
]


def test_curves_are_the_numbers_written(tmp_path):
  workdir = _make_workdir(tmp_path / "text", kind="text", train=TEXT_TRAIN, evals=TEXT_EVALS)
  curves, non_finite = plot_metrics.load(str(workdir))

  # Byte tokenizer: nats per byte / ln 2; step 30's NaN was superseded by the resumed 3.5.
  train = curves["train/bits_per_byte"]
  assert train.unit == "bits/byte"
  np.testing.assert_array_equal(train.steps, [10, 20, 30, 40])
  np.testing.assert_allclose(train.values, np.array([5.0, 4.0, 3.5, 3.0]) / math.log(2),
                             rtol=1e-15)
  assert non_finite == 1
  assert "train/loss" not in curves

  expected = {"heldout/bits_per_byte": ([20, 40], [5.6, 4.2], "bits/byte"),
              "heldout/loss": ([20, 40], [3.9, 2.9], "nats"),
              "heldout/xz_bits_per_byte": ([20, 40], [2.25, 2.0], "bits/byte"),
              "heldout/gzip_bits_per_byte": ([20, 40], [2.5, 2.75], "bits/byte"),
              "heldout_step_rescale2/bits_per_byte": ([40], [4.5], "bits/byte"),
              "heldout_step_rescale2/loss": ([40], [3.1], "nats")}
  assert {k for k in curves if not k.startswith("train/")} == set(expected)
  for name, (steps, values, unit) in expected.items():
    np.testing.assert_array_equal(curves[name].steps, steps, err_msg=name)
    np.testing.assert_array_equal(curves[name].values, values, err_msg=name)
    assert curves[name].unit == unit, name
  # Baselines are the latest eval record's values.
  assert plot_metrics.baselines(curves, "heldout") == {"xz": (2.0, "bits/byte"),
                                                       "gzip": (2.75, "bits/byte")}


def test_train_loss_stays_in_nats_when_no_exact_conversion(tmp_path):
  audio = plot_metrics.load(str(_make_workdir(
      tmp_path / "audio", kind="audio", train=[(5, 2.0), (10, 1.5)])))[0]
  np.testing.assert_allclose(audio["train/bits_per_sample"].values,
                             np.array([2.0, 1.5]) / math.log(2), rtol=1e-15)
  sentencepiece = plot_metrics.load(str(_make_workdir(
      tmp_path / "spm", kind="text", tokenizer="/models/spm.model",
      train=[(5, 2.0), (10, 1.5)])))[0]
  assert list(sentencepiece) == ["train/loss"]
  np.testing.assert_array_equal(sentencepiece["train/loss"].values, [2.0, 1.5])
  assert sentencepiece["train/loss"].unit == "nats"
  classify = plot_metrics.load(str(_make_workdir(
      tmp_path / "digits", kind="audio", task="classify", train=[(5, 2.0)],
      evals=[(5, "heldout", {"loss": 1.75, "accuracy": 0.375})])))[0]
  assert classify["train/loss"].unit == "nats"
  assert classify["heldout/accuracy"].unit == "accuracy"
  np.testing.assert_array_equal(classify["heldout/accuracy"].values, [0.375])


def test_accuracy_goes_on_a_right_axis_and_loss_joins_the_training_loss(tmp_path):
  workdir = _make_workdir(
      tmp_path / "digits", kind="audio", task="classify", train=[(5, 2.0), (10, 1.0)],
      evals=[(5, "heldout", {"loss": 1.75, "accuracy": 0.375}),
             (10, "heldout", {"loss": 1.25, "accuracy": 0.625})])
  figure = plot_metrics.draw({"digits": plot_metrics.load(str(workdir))[0]},
                             str(tmp_path / "out.png"))
  left, right = figure.axes
  assert left.get_title() == "digits" and left.get_ylabel() == "loss (nats)"
  assert right.get_ylabel() == "accuracy"
  left_lines = {line.get_label(): line.get_ydata().tolist() for line in left.get_lines()}
  right_lines = {line.get_label(): line.get_ydata().tolist() for line in right.get_lines()}
  assert left_lines == {"train loss": [2.0, 1.0], "heldout loss": [1.75, 1.25]}
  assert right_lines == {"heldout accuracy": [0.375, 0.625]}


def test_smooth_is_a_trailing_moving_average(tmp_path):
  values = [4.0, 2.0, 6.0, 1.0, 3.0, 8.0]
  workdir = _make_workdir(tmp_path / "audio", kind="audio",
                          train=[(10 * (i + 1), v) for i, v in enumerate(values)])
  figure = plot_metrics.draw({"audio": plot_metrics.load(str(workdir))[0]},
                             str(tmp_path / "out.png"), smooth=3)
  smoothed = [line for line in figure.axes[0].get_lines() if "3-point mean" in line.get_label()]
  assert len(smoothed) == 1
  expected = [sum(values[i - 2:i + 1]) / 3 / math.log(2) for i in range(2, len(values))]
  np.testing.assert_array_equal(smoothed[0].get_xdata(), [30, 40, 50, 60])
  np.testing.assert_allclose(smoothed[0].get_ydata(), expected, rtol=1e-12)


def test_command_writes_a_png_of_the_stated_size_and_prints_the_final_figures(tmp_path):
  text = _make_workdir(tmp_path / "text_run", kind="text", train=TEXT_TRAIN, evals=TEXT_EVALS)
  audio = _make_workdir(tmp_path / "audio_run", kind="audio", train=[(5, 2.0), (10, 1.5)],
                        evals=[(10, "heldout", {"loss": 1.4, "bits_per_sample": 2.125,
                                                "xz_bits_per_sample": 1.875})])
  output = tmp_path / "docs" / "curves.png"  # docs/ does not exist yet
  result = _run_tool("--workdirs", str(text), str(audio), "--output", str(output),
                     "--title", "test runs", "--smooth", "2")
  assert result.returncode == 0, result.stderr
  assert output.read_bytes()[:8] == PNG_MAGIC
  assert matplotlib.image.imread(str(output)).shape[:2] == (400, 2 * 600)

  lines = result.stdout.strip().splitlines()
  assert lines[0] == str(output)
  assert lines[1].startswith("text_run: ")
  assert f"train {3.0 / math.log(2):.4f} bits/byte at step 40" in lines[1]
  assert "1 non-finite" in lines[1]
  assert "heldout 4.2000 bits/byte at step 40" in lines[1]
  assert "heldout_step_rescale2 4.5000 bits/byte at step 40" in lines[1]
  assert "xz 2.0000 bits/byte" in lines[1] and "gzip 2.7500 bits/byte" in lines[1]
  assert lines[2].startswith("audio_run: ")
  assert f"train {1.5 / math.log(2):.4f} bits/sample at step 10" in lines[2]
  assert "heldout 2.1250 bits/sample at step 10" in lines[2]
  assert "xz 1.8750 bits/sample" in lines[2]


def test_single_panel_size(tmp_path):
  workdir = _make_workdir(tmp_path / "only", kind="audio", train=[(1, 1.0)])
  output = tmp_path / "one.png"
  result = _run_tool("--workdirs", str(workdir), "--output", str(output))
  assert result.returncode == 0, result.stderr
  assert matplotlib.image.imread(str(output)).shape[:2] == (400, 600)


def test_missing_metrics_file_exits_2_naming_it(tmp_path):
  good = _make_workdir(tmp_path / "good", kind="audio", train=[(1, 1.0)])
  empty = tmp_path / "empty"
  empty.mkdir()
  output = tmp_path / "out.png"
  result = _run_tool("--workdirs", str(good), str(empty), "--output", str(output))
  assert result.returncode == 2
  assert str(empty / "metrics.jsonl") in result.stderr
  assert not output.exists()


def test_metrics_file_that_is_not_json_lines_exits_2_naming_it(tmp_path):
  workdir = _make_workdir(tmp_path / "bad", kind="audio", train=[(1, 1.0)])
  with open(workdir / "eval" / "metrics.jsonl", "a") as f:
    f.write("{not json\n")
  result = _run_tool("--workdirs", str(workdir), "--output", str(tmp_path / "out.png"))
  assert result.returncode == 2
  assert str(workdir / "eval" / "metrics.jsonl") in result.stderr


def test_config_that_is_not_json_exits_2_naming_it(tmp_path):
  workdir = _make_workdir(tmp_path / "bad", kind="audio", train=[(1, 1.0)])
  (workdir / "config.json").write_text("{")
  result = _run_tool("--workdirs", str(workdir), "--output", str(tmp_path / "out.png"))
  assert result.returncode == 2
  assert str(workdir / "config.json") in result.stderr
