"""Compressor baselines: the project's figures match the xz and gzip command-line tools."""

import shutil
import subprocess

import numpy as np
import pytest

from s5scale import baselines


@pytest.mark.parametrize("tool, flags, key", [("xz", ["-9e", "--format=xz"], "xz"),
                                              ("gzip", ["-9", "-n"], "gzip")])
def test_bits_match_command_line_tools(tool, flags, key):
  if shutil.which(tool) is None:
    pytest.fail(f"{tool} is not installed; it is the oracle for this test")
  with open(baselines.__file__, "rb") as f:
    payload = f.read() * 3
  compressed = subprocess.run([tool, *flags, "-c"], input=payload, capture_output=True,
                              check=True).stdout
  expected = 8 * len(compressed) / len(payload)
  measured = baselines.compressed_bits_per_symbol(payload, len(payload))[key]
  # Container headers differ by a few bytes between the library and the tool.
  assert abs(measured - expected) * len(payload) / 8 <= 64


def test_scored_symbols_keep_stream_order_and_drop_padding():
  batch = {"targets": np.array([[1, 2, 3], [4, 5, 6]]),
           "mask": np.array([[1, 1, 0], [1, 0, 0]], np.float32)}
  assert baselines.scored_symbols(batch).tolist() == [1, 2, 4]
