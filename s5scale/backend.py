"""Picks JAX's platform before its backends start, so a machine with no TPU starts quietly.

With libtpu installed (the `tpu` extra) and JAX_PLATFORMS unset, JAX tries every backend it knows;
on a machine with no TPU chip, libtpu's start-up then prints `E0000 ... INVALID_ARGUMENT:
unexpected worker hostname` and a `Source Location Trace` before JAX falls back to CPU. JAX's own
Cloud TPU set-up already looks for TPU chips on the PCI bus (and sets jax_platforms to "tpu,cpu"
when it finds some); when it finds none, and no GPU is visible either, we ask for the CPU
directly. An explicit JAX_PLATFORMS (or jax_platforms) is always left as it is.
"""

import glob
import os

from absl import logging


def tpu_chips_present() -> bool:
  try:  # the same PCI scan JAX's cloud_tpu_init uses to decide whether this is a TPU VM
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except (ImportError, AttributeError, OSError):
    # TPU device files: /dev/accel* (v2-v4, v5p), /dev/vfio (v5e, v6e).
    return bool(glob.glob("/dev/accel*")) or os.path.exists("/dev/vfio")


def gpu_present() -> bool:
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    return hardware_utils.has_visible_nvidia_gpu() or hardware_utils.num_available_amd_gpus(1) > 0
  except (ImportError, AttributeError, OSError):
    return os.path.exists("/dev/nvidia0")


def choose_platform() -> None:
  """Call before anything asks JAX for devices."""
  import jax  # pylint: disable=g-import-not-at-top
  if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
    return
  if tpu_chips_present() or gpu_present():
    return
  jax.config.update("jax_platforms", "cpu")
  os.environ["JAX_PLATFORMS"] = "cpu"  # grain worker processes start JAX too
  logging.info("no TPU or GPU on this machine: JAX runs on the CPU (set JAX_PLATFORMS to choose)")
