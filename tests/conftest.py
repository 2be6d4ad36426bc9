"""Test setup: 8 simulated CPU devices (for (2, 2, 2) meshes) and the path to ../shared/data."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402

SHARED_DATA = os.environ.get(
  "SPECJAX_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
)


@pytest.fixture(scope="session")
def shared_data():
  """../shared/data (the repository's neighbour in CI); tests that need real text skip without it."""
  if not os.path.isdir(SHARED_DATA):
    pytest.skip(
      f"needs the shared data folder at {os.path.abspath(SHARED_DATA)} (set SPECJAX_SHARED_DATA to point elsewhere)"
    )
  return os.path.abspath(SHARED_DATA)
