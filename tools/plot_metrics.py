"""Learning curves (PNG) from training workdirs' metrics files, for docs/results.md.

  python tools/plot_metrics.py --workdirs workdirs/text_small workdirs/audio_small \
      --output docs/learning_curves.png [--title "..."] [--smooth 20]

One panel per workdir, side by side, each 6 x 4 inches at 100 dpi (600 x 400 pixels), titled with
the workdir's name. x is the training step. The left axis holds the training loss (WORKDIR/
metrics.jsonl) in the eval's unit where that conversion is exact:
  - audio LM: one token is one sample, so loss / ln 2 is bits/sample;
  - text with the byte tokenizer: one token is one byte, so loss / ln 2 is bits/byte (to within
    the one end-of-document token per document, which the eval's bits/byte leaves out);
  - otherwise (SentencePiece text, classification, no config.json) it stays in nats.
Held-out results (WORKDIR/eval/metrics.jsonl) are points per evaluated step, one line per split
("heldout", and any other split such as a step-rescaled one): bits/byte, bits/sample or accuracy.
A result whose unit differs from the left axis (accuracy, or bits/byte beside a loss in nats)
goes on a right-hand axis; the held-out loss in nats then joins the training loss on the left.
Compressor baselines (xz, gzip) are dashed horizontal lines at each split's latest values.

Nothing is smoothed unless --smooth N asks for a trailing N-step moving average of the training
curve (the raw curve stays, faint). Prints the output path and, per workdir, the last values
plotted. Exit 2: a workdir without metrics.jsonl, or a metrics file that is not JSON lines.
"""

import argparse
import math
import os
import sys
from typing import NamedTuple

import matplotlib
matplotlib.use("Agg")  # headless: no display on training hosts or in CI
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from s5scale import metrics, storage  # pylint: disable=g-import-not-at-top,wrong-import-position

PANEL_INCHES = (6.0, 4.0)
DPI = 100
EXIT_BAD_INPUT = 2

# Eval results in the order that picks a split's headline metric, with their units.
HEADLINE_UNITS = {"bits_per_byte": "bits/byte", "bits_per_sample": "bits/sample",
                  "accuracy": "accuracy"}
# Compressor baselines are "<compressor>_bits_per_byte" etc. (s5scale/evaluation.py).
BASELINE_SUFFIXES = {"_bits_per_byte": "bits/byte", "_bits_per_sample": "bits/sample"}
BASELINE_COLORS = ["tab:gray", "tab:olive", "tab:brown", "tab:pink"]


class Curve(NamedTuple):
  steps: np.ndarray   # (n,) int64, increasing
  values: np.ndarray  # (n,) float64, finite
  unit: str           # "bits/byte", "bits/sample", "nats" or "accuracy"


class BadInput(Exception):
  """A workdir or metrics file this tool cannot plot; the message names it."""


# ----------------------------------------------------------------------------- data extraction

def read_records(path: str) -> list[dict]:
  try:
    return metrics.read_jsonl(path)
  except ValueError as error:  # json.JSONDecodeError: a hand-edited or foreign file
    raise BadInput(f"{path}: not JSON lines ({error})") from error


def train_unit(config: dict) -> str:
  """Unit of training loss / ln 2 when it is exact (module docstring), else "nats"."""
  model, data = config.get("model", {}), config.get("data", {})
  if model.get("task") != "lm":
    return "nats"
  if data.get("kind") == "audio":
    return "bits/sample"
  if data.get("kind") == "text" and data.get("tokenizer") == "bytes":
    return "bits/byte"
  return "nats"


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray, int]:
  """(steps, values, non-finite count) of `key`; a step logged twice (a resumed run) keeps
  its last value."""
  by_step, non_finite = {}, 0
  for record in records:
    if key not in record or "step" not in record:
      continue
    try:
      value = float(record[key])  # non-finite values are stored as strings ("nan")
    except (TypeError, ValueError):
      value = math.nan
    if math.isfinite(value):
      by_step[int(record["step"])] = value
    else:
      by_step.pop(int(record["step"]), None)
      non_finite += 1
  steps = np.array(sorted(by_step), np.int64)
  return steps, np.array([by_step[s] for s in steps], np.float64), non_finite


def load(workdir: str) -> tuple[dict[str, Curve], int]:
  """(every curve of the workdir by name, number of non-finite training losses left out).

  Names: "train/bits_per_byte" or "train/bits_per_sample" (loss / ln 2) or "train/loss" (nats),
  and "<split>/<metric>" for each eval split's loss, bits_per_byte, bits_per_sample, accuracy and
  compressor baselines ("<split>/xz_bits_per_byte", ...).
  """
  train_path = storage.join(workdir, "metrics.jsonl")
  if not storage.path(train_path).is_file():
    raise BadInput(f"{train_path}: no such file (is {workdir!r} a training workdir?)")
  train_records = read_records(train_path)
  if not train_records:
    raise BadInput(f"{train_path}: no training records")
  config_path = storage.join(workdir, "config.json")
  config = {}
  if storage.path(config_path).is_file():
    try:
      config = storage.read_json(config_path)
    except ValueError as error:
      raise BadInput(f"{config_path}: not JSON ({error})") from error

  result = {}
  unit = train_unit(config)
  steps, values, non_finite = _series(train_records, "loss")
  if unit == "nats":
    result["train/loss"] = Curve(steps, values, "nats")
  else:
    result["train/" + unit.replace("/", "_per_")] = Curve(steps, values / math.log(2), unit)

  eval_records = read_records(storage.join(workdir, "eval", "metrics.jsonl"))
  keys = sorted({k for record in eval_records for k in record if "/" in k})
  for key in keys:
    metric = key.split("/", 1)[1]
    unit = (HEADLINE_UNITS.get(metric) or ("nats" if metric == "loss" else None)
            or next((u for s, u in BASELINE_SUFFIXES.items() if metric.endswith(s)), None))
    if unit:
      eval_steps, eval_values, _ = _series(eval_records, key)
      if len(eval_steps):
        result[key] = Curve(eval_steps, eval_values, unit)
  return result, non_finite


def splits(workdir_curves: dict[str, Curve]) -> list[str]:
  names = {name.split("/", 1)[0] for name in workdir_curves if not name.startswith("train/")}
  return sorted(names, key=lambda split: (split != "heldout", split))


def headline(workdir_curves: dict[str, Curve], split: str) -> str | None:
  """The name of a split's main result: bits/byte, bits/sample, accuracy, else its loss."""
  for metric in [*HEADLINE_UNITS, "loss"]:
    if f"{split}/{metric}" in workdir_curves:
      return f"{split}/{metric}"
  return None


def baselines(workdir_curves: dict[str, Curve], split: str) -> dict[str, tuple[float, str]]:
  """Compressor -> (latest value, unit) for one split."""
  found = {}
  for name, curve in workdir_curves.items():
    for suffix in BASELINE_SUFFIXES:
      if name.startswith(split + "/") and name.endswith(suffix):
        found[name[len(split) + 1:-len(suffix)]] = (float(curve.values[-1]), curve.unit)
  return found


def moving_average(steps: np.ndarray, values: np.ndarray, window: int):
  """Trailing mean over `window` points, placed at each window's last step."""
  window = min(window, len(values))
  if window <= 1:
    return steps, values
  means = np.convolve(values, np.ones(window) / window, mode="valid")
  return steps[window - 1:], means


# ----------------------------------------------------------------------------- drawing

def _axis_label(unit: str) -> str:
  return {"nats": "loss (nats)", "accuracy": "accuracy"}.get(unit, unit)


def draw_panel(axes, name: str, workdir_curves: dict[str, Curve], smooth: int) -> None:
  train_name = next(n for n in workdir_curves if n.startswith("train/"))
  train = workdir_curves[train_name]
  left_unit = train.unit
  train_label = "train loss" if left_unit == "nats" else "train (loss / ln 2)"
  if smooth > 1:
    axes.plot(train.steps, train.values, color="C0", alpha=0.3, linewidth=0.8)
    train_label += f", {smooth}-point mean"
  axes.plot(*moving_average(train.steps, train.values, smooth), color="C0", linewidth=1.2,
            label=train_label)
  axes.set_xlabel("step")
  axes.set_ylabel(_axis_label(left_unit))
  axes.set_title(name)
  axes.grid(alpha=0.3)

  right = None
  markers = "os^Dv<>"
  drawn_baselines = []
  for index, split in enumerate(splits(workdir_curves)):
    style = dict(color=f"C{index + 1}", marker=markers[index % len(markers)], markersize=5)
    main_name = headline(workdir_curves, split)
    if main_name is None:
      continue
    curve = workdir_curves[main_name]
    target = axes
    if curve.unit != left_unit:
      if right is None:
        right = axes.twinx()
        right.set_ylabel(_axis_label(curve.unit))
      target = right
      loss = workdir_curves.get(f"{split}/loss")
      if loss is not None and left_unit == "nats":
        axes.plot(loss.steps, loss.values, linestyle=":", label=f"{split} loss", **style)
    target.plot(curve.steps, curve.values, linestyle="-", label=f"{split} {curve.unit}", **style)

    for compressor, (value, unit) in baselines(workdir_curves, split).items():
      if any(abs(value - v) <= 1e-9 * abs(v) and c == compressor for c, v in drawn_baselines):
        continue  # another split over the same data: the same compressed size
      baseline_axes = axes if unit == left_unit else right if unit == curve.unit else None
      if baseline_axes is None:
        continue
      color = BASELINE_COLORS[len(drawn_baselines) % len(BASELINE_COLORS)]
      label = compressor if split == "heldout" else f"{compressor} ({split})"
      baseline_axes.axhline(value, color=color, linestyle="--", linewidth=1.0,
                            label=f"{label} baseline {value:.3f}")
      drawn_baselines.append((compressor, value))

  handles, labels = axes.get_legend_handles_labels()
  if right is not None:
    more_handles, more_labels = right.get_legend_handles_labels()
    handles, labels = handles + more_handles, labels + more_labels
  # Below the panel: curves falling (loss) and rising (accuracy) leave no free corner inside.
  axes.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2,
              fontsize="small", frameon=False)


def draw(panels: dict[str, dict[str, Curve]], output: str, title: str = "", smooth: int = 1):
  """Writes a PNG with one panel per workdir (PANEL_INCHES each, at DPI); returns the figure."""
  width, height = PANEL_INCHES
  figure, all_axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height),
                                  dpi=DPI, squeeze=False, layout="constrained")
  for axes, (name, workdir_curves) in zip(all_axes[0], panels.items()):
    draw_panel(axes, name, workdir_curves, smooth)
  if title:
    figure.suptitle(title)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  figure.savefig(output, dpi=DPI, format="png")  # no bbox_inches: keeps the stated pixel size
  return figure


# ----------------------------------------------------------------------------- report

def summary_line(name: str, workdir_curves: dict[str, Curve], non_finite: int) -> str:
  train_name = next(n for n in workdir_curves if n.startswith("train/"))
  train = workdir_curves[train_name]
  parts = [f"{name}: train {train.values[-1]:.4f} {train.unit} at step {train.steps[-1]}"
           if len(train.steps) else f"{name}: no finite training loss"]
  if non_finite:
    parts[0] += f" ({non_finite} non-finite values left out)"
  for split in splits(workdir_curves):
    main_name = headline(workdir_curves, split)
    if main_name:
      curve = workdir_curves[main_name]
      parts.append(f"{split} {curve.values[-1]:.4f} {curve.unit} at step {curve.steps[-1]}")
    parts += [f"{compressor} {value:.4f} {unit}"
              for compressor, (value, unit) in baselines(workdir_curves, split).items()]
  return " | ".join(parts)


def panel_name(workdir: str) -> str:
  return os.path.basename(os.path.normpath(workdir))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdirs", nargs="+", required=True, help="training workdirs")
  parser.add_argument("--output", required=True, help="PNG to write")
  parser.add_argument("--title", default="", help="figure title")
  parser.add_argument("--smooth", type=int, default=1,
                      help="trailing moving average of N training points (1: none)")
  args = parser.parse_args(argv)
  if args.smooth < 1:
    parser.error(f"--smooth must be >= 1, got {args.smooth}")
  try:
    loaded = {workdir: load(workdir) for workdir in args.workdirs}
  except BadInput as error:
    print(f"error: {error}", file=sys.stderr)
    return EXIT_BAD_INPUT
  panels = {panel_name(w): workdir_curves for w, (workdir_curves, _) in loaded.items()}
  if len(panels) < len(loaded):
    print("error: two --workdirs share a name; panels are titled by name", file=sys.stderr)
    return EXIT_BAD_INPUT
  draw(panels, args.output, args.title, args.smooth)
  print(args.output)
  for workdir, (workdir_curves, non_finite) in loaded.items():
    print(summary_line(panel_name(workdir), workdir_curves, non_finite))
  return 0


if __name__ == "__main__":
  sys.exit(main())
