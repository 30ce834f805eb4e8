"""Time from SIGTERM to a durable checkpoint, measured on a real training run, and the same budget
computed for a pod config's per-host state.

  python tools/preemption_budget.py --workdir=/tmp/budget            # a 50M+ parameter text model
  python tools/preemption_budget.py --workdir=gs://bucket/budget     # the same against a bucket
  python tools/preemption_budget.py --workdir=DIR --estimate=configs/audio_large.py --hosts=64 \
      --step_s=8.9

It starts `python -m s5scale.train` in a fresh --workdir, waits for --after_steps logged steps,
sends SIGTERM, and polls the workdir until the agreed step's checkpoint is complete (every part
orbax lists in the step's metadata is there): that moment is "durable". It prints one JSON line:
SIGTERM to durable, SIGTERM to exit, the checkpoint's bytes, and the write rate (those bytes over
the save's duration, which the trainer logs). With --estimate it also prints
that config's train-state bytes per host (parameters and optimizer state, sharded over the slice
and written once per shard), and the budget: the steps still run before every host stops (at most
two: the one in flight and the agreed next one), plus those bytes at the measured rate, against
--deadline_s (a spot VM's 30 s).
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

from etils import epath

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# About 51M parameters: text_small's stack made wide and deep, on short sequences so a CPU step
# is quick.
LARGE_TEXT = {"model.d_model": 1024, "model.ssm_size": 1024, "model.num_layers": 16,
              "data.batch_size": 2, "data.seq_len": 64, "train.num_steps": 100000,
              "train.log_every_steps": 1, "checkpoint.every_steps": 100000,
              "eval.every_steps": 0, "optim.warmup_steps": 1}


def train_command(config: str, workdir: str, overrides: dict) -> list[str]:
  return [sys.executable, "-m", "s5scale.train", f"--config={config}", f"--workdir={workdir}",
          *[f"--config.{k}={v}" for k, v in overrides.items()]]


def logged_steps(workdir: epath.Path) -> int:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return 0
  return sum(1 for line in path.read_text().splitlines() if line.strip())


def complete_steps(workdir: epath.Path) -> list[int]:
  from s5scale import checkpoint
  root = workdir / "checkpoints"
  if not root.exists():
    return []
  steps = [int(p.name) for p in root.iterdir() if p.name.isdigit()]
  return sorted(s for s in steps if not checkpoint.missing_parts(root, s))


def step_bytes(folder: epath.Path) -> int:
  # iterdir, not rglob: epath refuses a recursive glob on gs:// (one listing per folder is fine).
  return sum(step_bytes(p) if p.is_dir() else p.stat().length for p in folder.iterdir())


def measure(args) -> dict:
  workdir = epath.Path(args.workdir)
  if workdir.exists() and any(workdir.iterdir()):
    raise SystemExit(f"--workdir {workdir} must be empty or absent (the run starts from scratch)")
  overrides = dict(LARGE_TEXT, **dict(item.split("=", 1) for item in args.set))
  env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
  proc = subprocess.Popen(train_command(args.config, args.workdir, overrides), env=env,
                          cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  lines = []
  try:
    deadline = time.time() + args.timeout_s
    while logged_steps(workdir) < args.after_steps and proc.poll() is None:
      if time.time() > deadline:
        raise SystemExit(f"no {args.after_steps} steps within {args.timeout_s} s")
      time.sleep(0.05)
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    durable = None
    while time.time() < deadline and (durable is None or proc.poll() is None):
      if durable is None and complete_steps(workdir):
        durable = time.time()
      time.sleep(0.01)
    exited = time.time()
    lines = proc.communicate(timeout=60)[0].splitlines()
  finally:
    if proc.poll() is None:
      proc.kill()
  if proc.returncode != 0 or durable is None:
    raise SystemExit(f"trainer exit {proc.returncode}, durable={durable}:\n"
                     + "\n".join(lines[-40:]))
  step = complete_steps(workdir)[-1]
  size = step_bytes(workdir / "checkpoints" / str(step))
  # The trainer times its own save (save call to wait_until_finished): polling from here cannot
  # see when the writing starts.
  save_s = float(first_match(r"checkpoint saved in ([\d.]+) s", lines))
  return {"workdir": args.workdir, "parameters": first_match(r"model: (\S+) parameters", lines),
          "stopped_at_step": step, "sigterm_to_durable_s": round(durable - signalled, 3),
          "sigterm_to_exit_s": round(exited - signalled, 3), "checkpoint_bytes": size,
          "save_s": save_s, "write_rate_mb_per_s": round(size / max(save_s, 1e-3) / 1e6, 1)}


def first_match(pattern: str, lines: list[str]) -> str:
  found = next((m.group(1) for m in map(re.compile(pattern).search, lines) if m), None)
  if found is None:
    raise SystemExit(f"the trainer never logged {pattern!r}:\n" + "\n".join(lines[-40:]))
  return found


def state_bytes_per_host(config_path: str, hosts: int) -> dict:
  """The train state's bytes (parameters + optimizer state) on one host: orbax writes each shard
  once, spreading replicas' shares over the hosts that hold them (replica-parallel), so each
  host writes about total / hosts."""
  import jax
  import runpy
  from s5scale import data, optim, steps
  from s5scale.nn.model import S5Model
  config = runpy.run_path(config_path)["get_config"]()
  model = S5Model.from_config(config.model)
  sample = {"inputs": jax.ShapeDtypeStruct((1, 16), "int32")}
  if config.model.input_kind != "tokens":
    sample = data.example_batch(config.data, 1)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), sample["inputs"])["params"])
  optimizer, _ = optim.make_optimizer(config.optim, config.train.num_steps, params)
  opt_state = jax.eval_shape(optimizer.init, params)
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  total = nbytes(params) + nbytes(opt_state)
  return {"config": config_path, "parameters": sum(x.size for x in jax.tree.leaves(params)),
          "state_bytes": total, "hosts": hosts, "bytes_per_host": total // hosts}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a fresh run directory (local or gs://)")
  parser.add_argument("--config", default=os.path.join(REPO, "configs", "text_small.py"))
  parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                      help="config overrides on top of the 50M+ parameter text model")
  parser.add_argument("--after_steps", type=int, default=3)
  parser.add_argument("--timeout_s", type=float, default=1800)
  parser.add_argument("--estimate", default="", help="a pod config to compute the budget for")
  parser.add_argument("--hosts", type=int, default=64, help="hosts of its slice (v5e-256: 64)")
  # 8.9 s: audio_large's step on v5e:16x16 at tools/aot_compile.py's serial bound (nothing
  # overlapped; docs/tpu.md). A cost model, not a measurement: pass a measured step time.
  parser.add_argument("--step_s", type=float, default=8.9, help="its step time on that slice")
  parser.add_argument("--deadline_s", type=float, default=30.0)
  args = parser.parse_args(argv)
  result = measure(args)
  if args.estimate:
    per_host = state_bytes_per_host(args.estimate, args.hosts)
    write_s = per_host["bytes_per_host"] / (result["write_rate_mb_per_s"] * 1e6)
    budget = 2 * args.step_s + write_s
    result["estimate"] = dict(per_host, step_s=args.step_s, write_s=round(write_s, 2),
                              sigterm_to_durable_s=round(budget, 2),
                              fits=budget <= args.deadline_s, deadline_s=args.deadline_s)
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
