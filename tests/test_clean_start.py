"""A machine with no TPU starts quietly: no libtpu errors, whether or not libtpu is installed."""

import subprocess
import sys

from tests import helpers


def test_train_without_jax_platforms_prints_no_libtpu_errors(tmp_path):
  env = helpers.env_for()
  del env["JAX_PLATFORMS"]  # as a user runs it: nothing chosen
  flags = helpers.overrides(train__num_steps=2, checkpoint__every_steps=2, eval__every_steps=0)
  result = subprocess.run(helpers.command("train", "text_small.py", tmp_path, flags), env=env,
                          capture_output=True, text=True, timeout=600, cwd=helpers.REPO)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-3000:]
  bad = [line for line in output.splitlines()
         if "E0000" in line or "INVALID_ARGUMENT" in line or "Source Location Trace" in line]
  assert bad == [], bad
  assert "JAX runs on the CPU" in output


def platform_chosen(tpu_present: bool, jax_platforms=None) -> str:
  """jax_platforms after backend.choose_platform in a fresh process (no backend is started)."""
  env = helpers.env_for()
  del env["JAX_PLATFORMS"]
  if jax_platforms is not None:
    env["JAX_PLATFORMS"] = jax_platforms
  code = ("from s5scale import backend; import jax\n"
          f"backend.tpu_chips_present = lambda: {tpu_present}\n"
          "backend.gpu_present = lambda: False\n"
          "backend.choose_platform(); print(repr(jax.config.jax_platforms))")
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, cwd=helpers.REPO)
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout.strip()


def test_platform_is_left_to_jax_on_a_tpu_vm_or_when_chosen():
  assert platform_chosen(tpu_present=False) == "'cpu'"
  assert platform_chosen(tpu_present=True) == "None"  # JAX's cloud_tpu_init picks "tpu,cpu"
  assert platform_chosen(tpu_present=False, jax_platforms="cpu,tpu") == "'cpu,tpu'"
