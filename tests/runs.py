"""Launching s5scale's entry points from tests: tiny configs, subprocesses, metrics on disk."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A model and data small enough that a step compiles in seconds on 2 cores.
TINY = {
    "model.num_layers": 2, "model.d_model": 16, "model.ssm_size": 16, "model.blocks": 2,
    "data.batch_size": 8, "data.seq_len": 32, "optim.warmup_steps": 2,
    "train.log_every_steps": 1, "eval.max_batches": 2,
}


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
