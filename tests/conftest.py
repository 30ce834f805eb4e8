"""Shared pytest setup: JAX on CPU with 8 virtual devices (set before jax is imported), so
mesh tests can run in-process; single-device code still runs on device 0."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
