"""Workdirs and data on gs://, end to end, against a real GCS API server on 127.0.0.1.

The server is gcp-storage-emulator (pure Python, in the dev extra), started by a fixture through
tests/gcs_emulator.py, which adds what tensorstore needs and the stock emulator lacks. Every
client is pointed at it the way users point them at any emulator: STORAGE_EMULATOR_HOST
(google-cloud-storage, gcsfs) and TENSORSTORE_GCS_HTTP_URL (orbax's tensorstore). Nothing in the
path layer is mocked. Oracles: the bucket's object listing through google-cloud-storage, an
uninterrupted run's losses, the exit codes, and the local disk searched for stray `gs:` folders.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from tests import helpers
from tests.helpers import SAMPLE_RATE, speech_commands_tree

storage_client = pytest.importorskip("google.cloud.storage")
pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")

BUCKET = "bucket"
NUM_STEPS = 8
TEXT_FLAGS = helpers.overrides(
    data__source=f"gs://{BUCKET}/data/text", train__num_steps=NUM_STEPS,
    checkpoint__every_steps=4, checkpoint__async_save=True, eval__every_steps=0,
    data__heldout_fraction=0.25, generate__length=16, generate__num_samples=2)
AUDIO_FLAGS = helpers.overrides(data__heldout_fraction=0.3, data__sample_rate=SAMPLE_RATE,
                                data__batch_size=4, eval__every_steps=0, data__seq_len=400,
                                train__num_steps=2, checkpoint__every_steps=2)
LM_FLAGS = AUDIO_FLAGS + [f"--config.data.source=gs://{BUCKET}/shards", "--config.data.seq_len=64",
                          "--config.generate.length=64", "--config.generate.num_samples=2"]


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def _wait_until_listening(port: int, server: subprocess.Popen, timeout: float = 60) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert server.poll() is None, "the GCS emulator exited"
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      return
    except OSError:
      time.sleep(0.1)
  raise AssertionError("the GCS emulator never listened")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """A bucket on a GCS emulator; os.environ points every client (and every child) at it."""
  port = _free_port()
  log = open(tmp_path_factory.mktemp("emulator") / "emulator.log", "w")  # never a full pipe
  server = subprocess.Popen([sys.executable, f"{helpers.REPO}/tests/gcs_emulator.py", "127.0.0.1",
                             str(port), BUCKET], stdout=log, stderr=subprocess.STDOUT)
  _wait_until_listening(port, server)
  url = f"http://127.0.0.1:{port}"
  saved = dict(os.environ)
  os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
                    GOOGLE_CLOUD_PROJECT="test",
                    S5SCALE_CACHE_DIR=str(tmp_path_factory.mktemp("cache")))
  client = storage_client.Client(project="test",
                                 credentials=_anonymous_credentials())
  try:
    yield client.bucket(BUCKET)
  finally:
    os.environ.clear()
    os.environ.update(saved)
    server.terminate()
    server.wait(timeout=30)
    log.close()


def _anonymous_credentials():
  from google.auth.credentials import AnonymousCredentials  # pylint: disable=g-import-not-at-top
  return AnonymousCredentials()


def names(bucket, prefix: str) -> list[str]:
  return sorted(blob.name for blob in bucket.list_blobs(prefix=prefix))


def read_jsonl(bucket, name: str) -> list[dict]:
  text = bucket.blob(name).download_as_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def losses(bucket, run: str) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in read_jsonl(bucket, f"{run}/metrics.jsonl") if "loss" in r}


def upload_tree(bucket, local_root, prefix: str) -> None:
  for folder, _, files in os.walk(local_root):
    for name in files:
      path = os.path.join(folder, name)
      relative = os.path.relpath(path, local_root).replace(os.sep, "/")
      bucket.blob(f"{prefix}/{relative}").upload_from_filename(path)


@pytest.fixture(scope="module")
def text_data(gcs):
  """A few Python files of this repository as a text directory on gs://."""
  for name in ("storage.py", "metrics.py", "checkpoint.py", "cli.py"):
    gcs.blob(f"data/text/{name}").upload_from_filename(f"{helpers.REPO}/s5scale/{name}")
  return gcs


def wait_for_step(bucket, run: str, step: int, proc, timeout: float = 300) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if bucket.blob(f"{run}/metrics.jsonl").exists() and max(losses(bucket, run)) >= step:
      return
    time.sleep(0.2)
  raise AssertionError(f"trainer never reached step {step}: {proc.communicate()[0][-3000:]}")


@pytest.fixture(scope="module")
def text_run(text_data):
  """gs://bucket/run: trained, SIGTERM'd at step >= 2, resumed to the end, with evaluate --watch
  beside it; and gs://bucket/uninterrupted, the same run in one go."""
  bucket = text_data
  workdir = f"gs://{BUCKET}/run"
  reference = helpers.start("train", "text_small.py", f"gs://{BUCKET}/uninterrupted", TEXT_FLAGS)
  trainer = helpers.start("train", "text_small.py", workdir, TEXT_FLAGS)
  watcher = None
  try:
    wait_for_step(bucket, "run", 2, trainer)
    watcher = helpers.start("evaluate", "text_small.py", workdir,
                            TEXT_FLAGS + ["--watch", "--poll_seconds=0.5"])
    trainer.send_signal(signal.SIGTERM)
    preempted = trainer.communicate(timeout=300)[0]
    checkpoints_after_sigterm = names(bucket, "run/checkpoints/")
    status_after_sigterm = json.loads(bucket.blob("run/run_status.json").download_as_text())
    resumed = helpers.run("train", "text_small.py", workdir, TEXT_FLAGS)
    evaluated = watcher.communicate(timeout=300)[0]
    uninterrupted = reference.communicate(timeout=300)[0]
  finally:
    for proc in (reference, trainer, watcher):
      if proc is not None and proc.poll() is None:
        proc.kill()
  return dict(bucket=bucket, workdir=workdir, preempted=preempted, trainer=trainer,
              checkpoints_after_sigterm=checkpoints_after_sigterm,
              status_after_sigterm=status_after_sigterm, resumed=resumed,
              watcher=watcher, evaluated=evaluated, reference=reference,
              uninterrupted=uninterrupted)


@pytest.mark.slow
def test_sigterm_on_gs_exits_0_with_the_checkpoint_in_the_bucket(text_run):
  assert text_run["trainer"].returncode == 0, text_run["preempted"][-3000:]
  line = next(l for l in text_run["preempted"].splitlines() if "preempted at step" in l)
  stopped_at = int(line.split("preempted at step ")[1].split(",")[0])
  assert stopped_at < NUM_STEPS
  assert f"run/checkpoints/{stopped_at}/state/_METADATA" in text_run["checkpoints_after_sigterm"]
  # The supervisor's marker is one upload: a rename on GCS is a copy, and gcsfs's move retries.
  assert text_run["status_after_sigterm"] == {"status": "preempted", "step": stopped_at}
  assert "Failed to move file" not in text_run["preempted"]


@pytest.mark.slow
def test_resumed_gs_run_matches_an_uninterrupted_one_bit_for_bit(text_run):
  assert text_run["reference"].returncode == 0, text_run["uninterrupted"][-3000:]
  assert text_run["resumed"].returncode == 0, text_run["resumed"].stderr[-3000:]
  assert "resumed from checkpoint step" in text_run["resumed"].stderr
  bucket = text_run["bucket"]
  assert sorted(losses(bucket, "run")) == list(range(1, NUM_STEPS + 1))
  assert losses(bucket, "run") == losses(bucket, "uninterrupted")  # exact float equality


@pytest.mark.slow
def test_evaluate_watch_beside_the_trainer_scores_the_final_step(text_run):
  assert text_run["watcher"].returncode == 0, text_run["evaluated"][-3000:]
  records = read_jsonl(text_run["bucket"], "run/eval/metrics.jsonl")
  assert NUM_STEPS in {r["step"] for r in records if r.get("split") == "heldout"}, records


@pytest.mark.slow
def test_generate_and_inspect_checkpoint_on_a_gs_workdir(text_run):
  bucket, workdir = text_run["bucket"], text_run["workdir"]
  generated = helpers.run("generate", "text_small.py", workdir, TEXT_FLAGS)
  assert generated.returncode == 0, generated.stderr[-3000:]
  samples = names(bucket, "run/samples/run_1/")
  assert {"run/samples/run_1/settings.json", "run/samples/run_1/prompt.txt",
          f"run/samples/run_1/step_{NUM_STEPS}_sample_0.txt"} <= set(samples), samples
  inspected = subprocess.run(
      [sys.executable, f"{helpers.REPO}/tools/inspect_checkpoint.py", workdir],
      env=helpers.env_for(1), capture_output=True, text=True, timeout=300, cwd=helpers.REPO)
  assert inspected.returncode == 0, inspected.stderr[-3000:]
  assert f"{NUM_STEPS}" in inspected.stdout and "total" in inspected.stdout


@pytest.mark.slow
def test_plot_metrics_reads_the_records_back_as_json_lines(text_run, tmp_path):
  plotted = subprocess.run(
      [sys.executable, f"{helpers.REPO}/tools/plot_metrics.py", f"--workdirs={text_run['workdir']}",
       f"--output={tmp_path / 'curves.png'}"],
      env=helpers.env_for(1), capture_output=True, text=True, timeout=300, cwd=helpers.REPO)
  assert plotted.returncode == 0, plotted.stderr[-3000:]
  assert f"at step {NUM_STEPS}" in plotted.stdout and (tmp_path / "curves.png").exists()


@pytest.mark.slow
def test_config_records_and_logs_are_objects_in_the_bucket(text_run):
  objects = names(text_run["bucket"], "run/")
  for name in ("run/config.json", "run/metrics.jsonl", "run/eval/metrics.jsonl"):
    assert name in objects
  assert any(n.startswith("run/tb/train/") for n in objects)
  assert any(n.startswith("run/train.") and ".log." in n for n in objects), objects
  assert json.loads(text_run["bucket"].blob("run/config.json").download_as_text())["data"][
      "source"] == f"gs://{BUCKET}/data/text"


@pytest.fixture(scope="module")
def audio_runs(gcs, tmp_path_factory):
  """A Speech Commands tree on gs://, shards of it written to gs:// by tools/prepare_audio.py, a
  classifier trained on the tree and an audio LM trained on the shards, both with gs://
  workdirs."""
  local = tmp_path_factory.mktemp("sc")
  speech_commands_tree(local)
  upload_tree(gcs, local, "sc")
  # The classifier reads the tree, not the shards, so it trains while they are written.
  classifier = helpers.start("train", "speech_commands.py", f"gs://{BUCKET}/classifier",
                             AUDIO_FLAGS + [f"--config.data.source=gs://{BUCKET}/sc",
                                            "--config.train.num_steps=4"])
  try:
    prepared = subprocess.run(
        [sys.executable, f"{helpers.REPO}/tools/prepare_audio.py", f"--source=gs://{BUCKET}/sc",
         f"--output=gs://{BUCKET}/shards", f"--sample_rate={SAMPLE_RATE}", "--num_shards=2"],
        env=helpers.env_for(1), capture_output=True, text=True, timeout=300, cwd=helpers.REPO)
    lm = helpers.run("train", "spoken_digits_lm.py", f"gs://{BUCKET}/lm", LM_FLAGS)
    classifier_output = classifier.communicate(timeout=300)[0]
  finally:
    if classifier.poll() is None:
      classifier.kill()
  return dict(bucket=gcs, local=local, prepared=prepared, classifier=classifier,
              classifier_output=classifier_output, lm=lm)


@pytest.mark.slow
def test_prepare_audio_writes_shards_to_gs_and_an_lm_trains_on_them(audio_runs):
  bucket = audio_runs["bucket"]
  assert audio_runs["prepared"].returncode == 0, audio_runs["prepared"].stderr[-3000:]
  shards = names(bucket, "shards/")
  assert {"shards/shard-00000-of-00002.array_record", "shards/shard-00001-of-00002.array_record",
          "shards/shard-00000-of-00002.array_record.json"} <= set(shards), shards
  assert audio_runs["lm"].returncode == 0, audio_runs["lm"].stderr[-3000:]
  assert sorted(losses(bucket, "lm")) == [1, 2]
  assert "lm/checkpoints/2/state/_METADATA" in names(bucket, "lm/checkpoints/")


@pytest.mark.slow
def test_audio_samples_and_sample_quality_on_gs(audio_runs):
  bucket = audio_runs["bucket"]
  assert audio_runs["classifier"].returncode == 0, audio_runs["classifier_output"][-3000:]
  generated = helpers.run("generate", "spoken_digits_lm.py", f"gs://{BUCKET}/lm", LM_FLAGS)
  assert generated.returncode == 0, generated.stderr[-3000:]
  wavs = [n for n in names(bucket, "lm/samples/run_1/") if n.endswith(".wav")]
  assert len(wavs) == 2, wavs
  # The LM's WAVs, filed as a samples folder with a class folder, scored by the classifier.
  for index, name in enumerate(wavs):
    bucket.copy_blob(bucket.blob(name), bucket, f"clips/low/{index}.wav")
  scored = subprocess.run(
      [sys.executable, "-m", "s5scale.sample_quality", f"--samples_dir=gs://{BUCKET}/clips",
       f"--workdir=gs://{BUCKET}/quality", f"--classifier_workdir=gs://{BUCKET}/classifier",
       f"--reference=gs://{BUCKET}/sc"],
      env=helpers.env_for(1), capture_output=True, text=True, timeout=300, cwd=helpers.REPO)
  assert scored.returncode == 0, scored.stderr[-3000:]
  record = read_jsonl(bucket, "quality/eval/metrics.jsonl")[-1]
  assert record["split"] == "samples" and record["samples/num_samples"] == 2


@pytest.mark.slow
def test_nothing_named_gs_lands_on_local_disk(text_run, audio_runs):
  roots = {os.getcwd(), helpers.REPO, tempfile.gettempdir()}
  strays = [os.path.join(folder, name) for root in roots for folder, subfolders, _ in os.walk(root)
            for name in subfolders if name == "gs:"]
  assert strays == []
