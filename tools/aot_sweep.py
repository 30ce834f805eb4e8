"""The TPU fit table: tools/aot_compile.py over each config x topology, one row each.

  python tools/aot_sweep.py                       # every row below (CPU-heavy: minutes a row)
  python tools/aot_sweep.py --only=audio_large    # the rows whose config or topology matches
  python tools/aot_sweep.py --from_json=out.jsonl # the table from aot_compile's saved JSON lines

Each row is compiled in its own aot_compile.py process (no TPU needed, libtpu does it), so one
that does not fit or fails to compile is reported and the sweep goes on. Columns: parameters,
context (samples or tokens per row), chips; GiB per chip and % of HBM; the roofline's compute,
HBM, collective (ICI + DCN, on the links each collective's groups span) and host-offload times per
step; the overlapped bound (the largest term: which one, and MFU at it) and the serial bound (the
sum: step time, MFU and tokens/s per chip at it); see s5scale/cost_model.py. The TPU fit table in
docs/tpu.md is this tool's output.

Exit status: 0 every row fits, 1 some row does not fit or failed, 2 bad flags.
"""

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30

# (config, topology, slices, overrides). A second v5e-256 slice doubles the data-parallel ways,
# so audio_large keeps one window per pair of chips with twice the global batch. text_large's
# default 128 rows are two per v4-128 chip; on v5e-256 it runs one row per chip, as its docstring
# says (128 rows would leave half of the 256 batch ways empty).
ROWS = [
    ("configs/audio_large.py", "v5e:16x16", 1, ()),
    ("configs/audio_large.py", "v5e:16x16", 1, ("--config.model.scan_impl=auto",)),  # Pallas
    ("configs/audio_large.py", "v5e:16x16", 2, ("--config.data.batch_size=256",)),
    ("configs/audio_large.py", "v5p:8x8x4", 1, ()),
    ("configs/audio_xl.py", "v5e:16x16", 1, ()),
    ("configs/text_large.py", "v5e:16x16", 1, ("--config.data.batch_size=256",)),
]

HEADER = ("| config | topology | params | context | chips | GiB/chip | HBM | compute | memory "
          "| collectives | host | overlapped bound | MFU ≤ | serial step | serial MFU "
          "| serial tokens/s/chip |\n" + "|---" * 16 + "|")


def compile_row(config: str, topology: str, slices: int, overrides) -> dict:
  """aot_compile.py's JSON line for one row (with fits=False and an error when it failed)."""
  command = [sys.executable, os.path.join(REPO, "tools", "aot_compile.py"),
             f"--config={config}", f"--topology={topology}", f"--num_slices={slices}",
             *overrides]
  process = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                           env=dict(os.environ, PYTHONPATH=REPO))
  lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
  if lines:
    return dict(json.loads(lines[-1]), overrides=list(overrides))
  return dict(config=config, topology=topology, num_slices=slices, overrides=list(overrides),
              fits=False, error=process.stderr.strip().splitlines()[-1:] or ["no output"])


def table_row(result: dict) -> str:
  name = os.path.basename(result["config"]).removesuffix(".py")
  if result.get("overrides"):
    name += " " + " ".join(o.removeprefix("--config.") for o in result["overrides"])
  topology = result["topology"] + (f" × {result['num_slices']}" if result["num_slices"] > 1
                                   else "")
  if "memory" not in result:
    why = result.get("error", "")
    why = why[0] if isinstance(why, list) else why.splitlines()[0] if why else ""
    return f"| {name} | {topology} | | | | does not compile: {why[:120]} |" + " |" * 10
  memory, roofline = result["memory"]["total"], result["cost"]["roofline"]
  hbm = result["chip"]["hbm_bytes"]
  cells = [name, topology, f"{result['num_params'] / 1e9:.2f}B", f"{result['seq_len']:,}",
           str(result["num_chips"]), f"{memory / GiB:.2f}",
           f"{memory / hbm:.0%}" + ("" if result["fits"] else " (does not fit)"),
           *[f"{roofline[term] * 1e3:.0f} ms" for term in ("compute_s", "memory_s",
                                                           "collective_s", "host_s")],
           roofline["bound"], f"{roofline['mfu']:.1%}", f"{roofline['serial_s'] * 1e3:.0f} ms",
           f"{roofline['serial_mfu']:.1%}", f"{roofline['serial_tokens_per_s_per_chip']:,.0f}"]
  return "| " + " | ".join(cells) + " |"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="", help="run only rows whose config or topology "
                      "contains this")
  parser.add_argument("--from_json", help="render the table from aot_compile.py JSON lines")
  args = parser.parse_args(argv)
  if args.from_json:
    with open(args.from_json) as f:
      results = [json.loads(line) for line in f if line.startswith("{")]
  else:
    rows = [r for r in ROWS if args.only in r[0] or args.only in r[1]]
    if not rows:
      print(f"error: --only={args.only!r} matches no row", file=sys.stderr)
      return 2
    results = []
    for row in rows:
      results.append(compile_row(*row))
      print(json.dumps(results[-1]), flush=True)
  print(HEADER)
  for result in results:
    print(table_row(result))
  return 0 if all(r.get("fits") for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
