"""Day one through the real command line: bad input gets a message and exit 2 before any step,
a refused run leaves its workdir as it was, the workdir remembers its run, and TensorBoard shows
the loss. Oracles: exit codes and stderr of real processes, file hashes of the workdir before and
after, metrics.jsonl against the TensorBoard event files read back with their own protobufs."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

from tests import helpers

TINY_RUN = helpers.overrides(train__num_steps=4, checkpoint__every_steps=2, eval__every_steps=2)


def program(module: str, *args, cwd=helpers.REPO, timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", f"s5scale.{module}", *map(str, args)],
                        env=helpers.env_for(), capture_output=True, text=True, timeout=timeout,
                        cwd=cwd)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("newcomer") / "run"
  result = helpers.run("train", "text_small.py", workdir, TINY_RUN)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def six_text_files(tmp_path_factory):
  """Six documents: the default held-out fraction of 5 % holds none of them out."""
  folder = tmp_path_factory.mktemp("six")
  for index in range(6):
    (folder / f"doc{index}.txt").write_text(f"document {index} " * 40)
  return folder


CONFIG = f"--config={helpers.REPO}/configs/text_small.py"

# id: (program, arguments after the workdir/config, exit code, fragment of stderr or stdout)
REFUSED = {
    "empty held-out split": (
        "train", [CONFIG, "--config.data.source={six}", *TINY_RUN], 2,
        "heldout split of data.source"),
    "workdir is a file": ("train", [CONFIG, *TINY_RUN], 2, "is a file, not a folder"),
    "relative config from another folder": (
        "train", ["--config=configs/text_small.py", *TINY_RUN], 2,
        "--config=configs/text_small.py: no such file"),
    "evaluate into a workdir that is a file": (
        "evaluate", [CONFIG], 2, "cannot be used as a folder"),
    "key typo": ("train", [CONFIG, "--config.model.d_modle=32"], 2,
                 "did you mean model.d_model"),
    "unknown section": ("train", [CONFIG, "--config.xyz.d_model=32"], 2,
                        "valid sections: checkpoint, data"),
    "resume with another architecture": (
        "train", [CONFIG, *TINY_RUN, "--config.model.d_model=32"], 2, "another architecture"),
    "resume with another held-out split": (
        "train", [CONFIG, *TINY_RUN, "--config.data.heldout_fraction=0.2"], 2,
        "another held-out split"),
    "resume with the state carried": (
        "train", [CONFIG, *TINY_RUN, "--config.data.carry_state=True"], 2, "data.carry_state"),
    "evaluate a folder with no run and no config": ("evaluate", [], 2, "give --config"),
    "generate from a bidirectional model": (
        "generate", ["--config.model.bidirectional=true"], 2, "generation needs model.task='lm'"),
    "bad value": ("evaluate", ["--config.eval.max_batches=-1"], 2, "eval.max_batches=-1"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_runs_exit_2_with_a_message_and_leave_the_workdir_alone(
    case, trained, six_text_files, tmp_path):
  module, args, code, fragment = REFUSED[case]
  if case in ("workdir is a file", "evaluate into a workdir that is a file"):
    workdir = tmp_path / "a_file"
    workdir.write_text("not a folder")
  elif case.startswith(("resume", "generate", "bad value", "key typo")):
    workdir = tmp_path / "copy"
    shutil.copytree(trained, workdir)
  elif case == "evaluate a folder with no run and no config":
    workdir = tmp_path / "empty"
    workdir.mkdir()
  else:
    workdir = tmp_path / "fresh"
  args = [a.format(six=six_text_files) for a in args]
  before = helpers.tree_digest(workdir)
  started = time.time()
  result = program(module, f"--workdir={workdir}", *args, cwd=tmp_path)
  output = result.stderr + result.stdout
  assert result.returncode == code, output[-3000:]
  assert fragment in output, output[-3000:]
  assert "Traceback" not in output, output[-3000:]
  assert helpers.tree_digest(workdir) == before      # no log, config.json or checkpoint
  if case == "empty held-out split":
    assert time.time() - started < 30
    assert not workdir.exists()


ACCEPTED = {
    "help": ("evaluate", ["--help"], "--workdir"),
    "validate says so": ("validate", [CONFIG], "valid:"),
    "the run's own config.json as --config": ("evaluate", ["--config={workdir}/config.json"],
                                              "already has a 'heldout' record"),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_accepted_commands_exit_0_without_a_traceback(case, trained):
  module, args, fragment = ACCEPTED[case]
  args = [a.format(workdir=trained) for a in args]
  workdir_args = [] if module == "validate" else [f"--workdir={trained}"]
  result = program(module, *workdir_args, *args)
  output = result.stderr + result.stdout
  assert result.returncode == 0, output[-3000:]
  assert fragment in output, output[-3000:]
  assert "Traceback" not in output


def test_final_line_names_loss_eval_bad_files_and_workdir(trained):
  log = "".join(open(trained / name).read() for name in os.listdir(trained)
                if name.startswith("train.") and "INFO" in name)
  final = [line for line in log.splitlines() if "finished: 4 steps" in line][-1]
  losses = helpers.losses(trained)
  evals = [r for r in helpers.read_jsonl(trained / "eval" / "metrics.jsonl") if r["step"] == 4]
  assert f"loss {losses[4]:.4f}" in final
  assert f"heldout bits_per_byte {evals[0]['heldout/bits_per_byte']:.4f}" in final
  assert "bad files 0" in final and str(trained) in final


def test_workdir_alone_reproduces_the_full_command_line(trained, six_text_files, tmp_path):
  full, alone = tmp_path / "full", tmp_path / "alone"
  shutil.copytree(trained, full)
  shutil.copytree(trained, alone)
  for workdir in (full, alone):     # drop the inline eval's records: evaluate writes them anew
    os.remove(workdir / "eval" / "metrics.jsonl")
  length = "--config.generate.length=12"
  assert program("evaluate", CONFIG, f"--workdir={full}", *TINY_RUN).returncode == 0
  assert program("generate", CONFIG, f"--workdir={full}", *TINY_RUN, length).returncode == 0
  assert program("evaluate", f"--workdir={alone}").returncode == 0
  assert program("generate", f"--workdir={alone}", length).returncode == 0

  def records(workdir):
    return [{k: v for k, v in r.items() if "seconds" not in k}
            for r in helpers.read_jsonl(workdir / "eval" / "metrics.jsonl")]

  assert records(full) == records(alone) and len(records(full)) == 2
  samples = {w: {p: digest for p, digest in helpers.tree_digest(w / "samples").items()}
             for w in (full, alone)}
  assert samples[full] == samples[alone] and samples[full]

  # Another source is another measurement: a second record that names it, not "already done".
  other = program("evaluate", f"--workdir={alone}", f"--config.data.source={six_text_files}",
                  "--config.data.heldout_fraction=0.5", "--step=4")
  assert other.returncode == 0, other.stderr[-3000:]
  named = [r for r in helpers.read_jsonl(alone / "eval" / "metrics.jsonl") if r["step"] == 4]
  assert [r["data"]["source"] for r in named] == ["", str(six_text_files)]


def tensorboard_scalars(folder) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} read from the event files: TFRecord framing, tensorboardX's protos."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars = {}
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), "rb") as f:
      payload = f.read()
    offset = 0
    while offset < len(payload):
      (length,) = struct.unpack("<Q", payload[offset:offset + 8])
      event = event_pb2.Event.FromString(payload[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def test_tensorboard_holds_the_loss_of_metrics_jsonl_at_every_logged_step(trained):
  scalars = tensorboard_scalars(trained / "tb" / "train")
  records = helpers.read_jsonl(trained / "metrics.jsonl")
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  for key in ("loss", "learning_rate", "grad_norm", "accuracy"):
    assert sorted(scalars[key]) == [1, 2, 3, 4], key
    for record in records:
      assert scalars[key][record["step"]] == pytest.approx(record[key], rel=1e-6), key
  evals = tensorboard_scalars(trained / "tb" / "eval")
  assert sorted(evals["heldout/bits_per_byte"]) == [2, 4]


FAILING_EVAL = """
import os, runpy, sys, time
from s5scale import evaluation
marker = sys.argv.pop(1)
def failing_evaluate(self, params, batch_stats, split="heldout"):
  open(marker, "w").close()      # the parent sends SIGTERM now
  time.sleep(3)
  raise RuntimeError("the held-out data went away")
evaluation.Evaluator.evaluate = failing_evaluate
sys.argv[0] = "s5scale.train"
runpy.run_module("s5scale.train", run_name="__main__")
"""


def test_sigterm_during_a_failing_inline_eval_ends_with_a_checkpoint(tmp_path):
  workdir, marker = tmp_path / "run", tmp_path / "in_eval"
  flags = helpers.overrides(train__num_steps=50, checkpoint__every_steps=2, eval__every_steps=2)
  process = subprocess.Popen(
      [sys.executable, "-c", FAILING_EVAL, str(marker), CONFIG, f"--workdir={workdir}", *flags],
      env=helpers.env_for(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      cwd=helpers.REPO)
  deadline = time.time() + 300
  while not marker.exists() and process.poll() is None and time.time() < deadline:
    time.sleep(0.1)
  assert marker.exists(), process.communicate()[0][-3000:]
  process.send_signal(signal.SIGTERM)
  signalled = time.time()
  output, _ = process.communicate(timeout=60)
  assert time.time() - signalled < 60
  assert process.returncode != 0 and "the held-out data went away" in output
  steps = sorted(os.listdir(workdir / "checkpoints"))
  assert steps == ["2"], steps                 # the save of step 2 finished, none left as tmp
  saved = json.load(open(workdir / "checkpoints" / "2" / "meta" / "metadata"))
  assert saved["step"] == 2


def test_an_undecodable_audio_file_is_described_without_a_stream_repr():
  from s5scale.data import audio  # pylint: disable=g-import-not-at-top
  with pytest.raises(audio.UnreadableAudio) as raised:
    audio.load_waveform(b"RIFF but not really a wave file" * 4, 16000)
  assert "object at 0x" not in str(raised.value)
  assert str(raised.value).startswith("not decodable audio: Error opening the file")
