"""Classical compressors on the very bytes an eval scored, as reference points for bits/byte.

xz -9e (LZMA2, extreme preset) and gzip -9 see the held-out stream as one file, so they may use
context across documents, which the model is not given: a fair-to-generous comparison.
"""

import gzip
import lzma

import numpy as np


def compressed_bits_per_symbol(payload: bytes, num_symbols: int) -> dict[str, float]:
  """{"xz": bits, "gzip": bits} per symbol of `payload` (bytes, or 8-bit audio codes)."""
  if num_symbols == 0:
    return {}
  xz_size = len(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))
  gzip_size = len(gzip.compress(payload, compresslevel=9))
  return {"xz": 8 * xz_size / num_symbols, "gzip": 8 * gzip_size / num_symbols}


def scored_symbols(batch: dict) -> np.ndarray:
  """The targets that carry weight in a batch, in stream order: (n,) int."""
  return np.asarray(batch["targets"])[np.asarray(batch["mask"]) > 0]
