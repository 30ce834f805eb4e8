"""Shared pytest setup: JAX on CPU with 8 virtual devices (set before jax is imported), so
mesh tests can run in-process; single-device code still runs on device 0."""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

# The tests' programs compile the same few small models over and over. JAX's persistent cache,
# shared by this session's processes (both xdist workers and every program they start), compiles
# each one once. The cache is new for each session, so each model is still compiled once per run.
# xdist's workers inherit the controlling process's environment, so they share its folder.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ.update(
      JAX_COMPILATION_CACHE_DIR=tempfile.mkdtemp(prefix="s5scale-test-jax-"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def pytest_sessionfinish(session):
  if _OWN_CACHE and not hasattr(session.config, "workerinput"):  # the controller, last to finish
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

