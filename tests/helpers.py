"""Shared test helpers: tiny configs, running the programs as subprocesses, metrics on disk,
HLO walking and a synthetic Speech Commands tree. No test module imports another."""

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import soundfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A model and data small enough that a step compiles in seconds on 2 cores.
TINY = {
    "model.num_layers": 2, "model.d_model": 16, "model.ssm_size": 16, "model.blocks": 2,
    "data.batch_size": 8, "data.seq_len": 32, "optim.warmup_steps": 2,
    "train.log_every_steps": 1, "eval.max_batches": 2,
}


# Every projection group a block has (the S5 layer, a full GLU and an MLP), so model-parallel
# meshes shard the residual stream over H between all of them (tests/test_activation_sharding.py).
ALL_GROUPS = dict(model__activation="full_glu", model__mlp_ratio=2)


def overrides(**changes) -> list[str]:
  """--config.* flags: TINY updated by changes (keys written with __ for dots)."""
  values = dict(TINY)
  values.update({k.replace("__", "."): v for k, v in changes.items()})
  return [f"--config.{k}={v}" for k, v in values.items()]


def env_for(devices: int = 1, **extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env.update({k: str(v) for k, v in extra.items()})
  return env


def command(module: str, config: str, workdir, flags: list[str]) -> list[str]:
  return [sys.executable, "-m", f"s5scale.{module}", f"--config={REPO}/configs/{config}",
          f"--workdir={workdir}", *flags]


def run(module: str, config: str, workdir, flags: list[str], devices: int = 1, timeout=600,
        **env) -> subprocess.CompletedProcess:
  return subprocess.run(command(module, config, workdir, flags), env=env_for(devices, **env),
                        capture_output=True, text=True, timeout=timeout, cwd=REPO)


def start(module: str, config: str, workdir, flags: list[str], devices: int = 1,
          **env) -> subprocess.Popen:
  return subprocess.Popen(command(module, config, workdir, flags), env=env_for(devices, **env),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


def read_jsonl(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def losses(workdir) -> dict[int, float]:
  """step -> loss as written by the trainer (a later line for a step replaces an earlier one)."""
  return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))}


def tiny_config(**changes):
  """configs/text_small.py with TINY and `changes` (keys written with __ for dots) applied."""
  spec = importlib.util.spec_from_file_location("text_small", f"{REPO}/configs/text_small.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  values = dict(TINY)
  values.update({k.replace("__", "."): v for k, v in changes.items()})
  for key, value in values.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def train_in_process(config, workdir) -> dict[int, float]:
  """Trains in this process (as the train program does) and returns its losses by step."""
  from s5scale import preemption, training  # pylint: disable=g-import-not-at-top
  assert training.train(config, str(workdir), preemption.PreemptionWatcher()) == 0
  return losses(workdir)


def saved_state(workdir, step: int) -> dict:
  """The train state of a checkpoint as plain NumPy, read with orbax alone (no s5scale code)."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  reader = ocp.PyTreeCheckpointer()
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          reader.metadata(path).item_metadata.tree)
  return reader.restore(path, restore_args=as_numpy)


def wait_for_step(workdir, step: int, proc, timeout=300):
  """Blocks until the trainer has logged `step` (or has exited)."""
  import time  # pylint: disable=g-import-not-at-top
  deadline = time.time() + timeout
  path = os.path.join(workdir, "metrics.jsonl")
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(path) and max(losses(workdir), default=0) >= step:
      return
    time.sleep(0.05)
  raise AssertionError(f"trainer never reached step {step}")


def build_state(config, mesh):
  """A fresh train state of config's model, created sharded on mesh."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from s5scale import steps, training  # pylint: disable=g-import-not-at-top
  sample = {"inputs": np.zeros((config.data.batch_size, config.data.seq_len), np.int32)}
  model, optimizer, _, _, shardings = training.build_model_and_state(config, mesh, sample)
  state = jax.jit(lambda: nn.unbox(steps.init_train_state(model, optimizer, config, sample)),
                  out_shardings=shardings)()
  return state


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


def hlo_computations(hlo_text: str) -> dict[str, str]:
  """Computation name -> body text of an HLO module."""
  computations, name, lines = {}, None, []
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      name, lines = header.group(1), []
    elif line.startswith("}") and name:
      computations[name] = "\n".join(lines)
      name = None
    elif name:
      lines.append(line)
  return computations


def reachable(computations, root: str) -> set[str]:
  seen, todo = set(), [root]
  while todo:
    name = todo.pop()
    if name in seen or name not in computations:
      continue
    seen.add(name)
    todo += re.findall(r"(?:calls|body|condition|to_apply|branch_computations)=\{?%?([\w.\-]+)",
                       computations[name])
    todo += re.findall(r"branch_computations=\{([^}]*)\}", computations[name])
  return seen


SAMPLE_RATE = 4000
SPEAKERS = [f"spk{i}" for i in range(12)]
WORDS = {"low": 200.0, "high": 1100.0}


def speech_commands_tree(root):
  """root/<word>/<speaker>_nohash_0.wav: a tone per word, 0.1 s, with speaker-dependent phase."""
  time = np.arange(SAMPLE_RATE // 10) / SAMPLE_RATE
  for word, frequency in WORDS.items():
    (root / word).mkdir(parents=True)
    for number, speaker in enumerate(SPEAKERS):
      tone = 0.5 * np.sin(2 * np.pi * frequency * time + number)
      soundfile.write(root / word / f"{speaker}_nohash_0.wav", tone, SAMPLE_RATE, subtype="PCM_16")
  (root / "_background_noise_").mkdir()
  soundfile.write(root / "_background_noise_" / "noise.wav",
                  np.random.default_rng(0).normal(0, 0.1, SAMPLE_RATE), SAMPLE_RATE)


def heldout_speakers(fraction):
  return [s for s in SPEAKERS
          if int.from_bytes(hashlib.sha1(s.encode()).digest()[:8], "big") / 2**64 < fraction]


def tree_digest(directory) -> dict[str, str]:
  """{relative path: sha256} of every file below directory ({} when it does not exist)."""
  digests = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        digests[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return digests
