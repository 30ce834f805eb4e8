"""tools/inspect_checkpoint.py: steps, config, parameter tree, export, damaged steps.

Oracle: the parameters read back by orbax's PyTreeCheckpointer alone (not through s5scale), and
files damaged on disk by this test.
"""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import helpers

TOOL = os.path.join(helpers.REPO, "tools", "inspect_checkpoint.py")


def _orbax_params(workdir, step: int) -> dict:
  """{"a/b/c": array} of the saved params, restored by orbax directly as NumPy."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  reader = ocp.PyTreeCheckpointer()
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          reader.metadata(path).item_metadata.tree)
  params = reader.restore(path, restore_args=as_numpy)["params"]
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return {"/".join(str(key.key) for key in path): leaf for path, leaf in flat}


def _inspect(*args):
  env = helpers.env_for()
  # Keep this interpreter's extra paths (where an optional safetensors may be installed).
  env["PYTHONPATH"] = os.pathsep.join([helpers.REPO, os.environ.get("PYTHONPATH", "")])
  return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True,
                        timeout=300, env=env, cwd=helpers.REPO)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("inspect") / "run"
  result = helpers.run("train", "text_small.py", workdir, helpers.overrides(
      train__num_steps=4, checkpoint__every_steps=2, eval__every_steps=0), timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_lists_steps_config_difference_and_parameter_tree(trained):
  result = _inspect(trained, f"--config={helpers.REPO}/configs/text_small.py")
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  for step in (2, 4):
    assert any(line.split()[:1] == [str(step)] and "data=1" in line for line in lines)
  assert "model.d_model: checkpoint=16 config=256" in result.stdout
  expected = _orbax_params(trained, 4)
  for name, array in expected.items():
    row = next(line for line in lines if line.split()[:1] == [name])
    assert str(array.shape).replace(" ", "") in row.replace(" ", "") and str(array.dtype) in row
  total = sum(array.size for array in expected.values())
  assert f"{total:,}" in next(line for line in lines if line.split()[:1] == ["total"])


def test_exported_params_equal_those_orbax_restores(trained, tmp_path):
  result = _inspect(trained, "--step=2", f"--export={tmp_path / 'params.npz'}")
  assert result.returncode == 0, result.stderr[-3000:]
  expected = _orbax_params(trained, 2)
  with np.load(tmp_path / "params.npz") as exported:
    assert sorted(exported.files) == sorted(expected)
    for name, array in expected.items():
      np.testing.assert_array_equal(exported[name], array, err_msg=name)
  assert not np.array_equal(np.load(tmp_path / "params.npz")["head/kernel"],
                            _orbax_params(trained, 4)["head/kernel"])


def test_safetensors_export_equals_orbax(trained, tmp_path):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  result = _inspect(trained, f"--export={tmp_path / 'params.safetensors'}")
  assert result.returncode == 0, result.stderr[-3000:]
  exported = safetensors_numpy.load_file(str(tmp_path / "params.safetensors"))
  for name, array in _orbax_params(trained, 4).items():
    np.testing.assert_array_equal(exported[name], array, err_msg=name)


def test_a_damaged_step_is_named_and_nothing_crashes(trained, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  (workdir / "checkpoints" / "4" / "state" / "_METADATA").write_text("{not json")
  result = _inspect(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  damaged = [line for line in result.stdout.splitlines() if "DAMAGED" in line]
  assert len(damaged) == 1 and damaged[0].split()[0] == "4"
  assert "parameters of step 2:" in result.stdout     # falls back to the newest readable step
  result = _inspect(workdir, "--step=4")
  assert result.returncode == 2
  assert any(line.startswith("error: step 4 is not a readable")
             for line in result.stderr.splitlines())
  # Array data cut short behind intact metadata: found when the export reads it. (Every data
  # file: OCDBT packs arrays into files in no fixed order, and the export reads params only.)
  state = workdir / "checkpoints" / "2" / "state"
  for data_file in (p for p in state.rglob("*") if p.is_file() and p.parent.name == "d"):
    with open(data_file, "r+b") as f:
      f.truncate(os.path.getsize(data_file) // 2)
  result = _inspect(workdir, "--step=2", f"--export={tmp_path / 'p.npz'}")
  # orbax logs its own traceback; the tool then exits 2 with one line naming the step.
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  # Named as damaged either when listed (the OCDBT tree is cut too) or when its arrays are read.
  assert errors and errors[0].startswith(("error: step 2 is not a readable",
                                          f"error: step 2 of {workdir} is damaged")), errors
