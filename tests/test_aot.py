"""specjax.aot, the ahead-of-time fit check: the tiny presets on 8 CPU devices compile for real;
a TPU topology without libtpu must say so in one plain line."""

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from specjax import aot
from specjax.errors import SpecjaxError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
  "--target",
  "tiny",
  "--drafter",
  "tiny-drafter",
  "--topology",
  "cpu:8",
  "--train_batch",
  "8",
  "--seq_len",
  "32",
  "--max_len",
  "64",
]


def run_main(argv):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = aot.main(argv)
  return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def train_and_sps(tmp_path_factory):
  path = tmp_path_factory.mktemp("aot") / "report.json"
  code, out, err = run_main(TINY + ["--methods", "sps", "--json", str(path)])
  return code, out, err, path


def test_train_step_and_speculative_loop_compile(train_and_sps):
  code, out, err, path = train_and_sps
  assert code == 0, err
  report = json.loads(path.read_text())
  assert [p["program"] for p in report["programs"]] == ["train", "decode sps (gamma 5)"]
  assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert report["topology"]["platform"] == "cpu" and report["topology"]["devices"] == 8
  for p in report["programs"]:
    assert p["argument_bytes"] > 0 and p["temp_bytes"] > 0, p
    assert p["total_bytes"] == p["argument_bytes"] + p["output_bytes"] + p["temp_bytes"] - p["alias_bytes"]
    assert p["capacity_bytes"] is None and p["fits"] is None and p["verdict"] == "capacity unknown"
    assert p["compile_s"] > 0
  train = report["programs"][0]
  assert train["alias_bytes"] > 0  # the donated state is updated in place
  assert "train" in out and "decode sps (gamma 5)" in out and "capacity unknown" in out
  assert report["settings"]["prompt_len"] == 64 - 5 - 2  # the longest prompt the cache admits


def test_mesh_2_2_2_and_a_verdict_against_a_capacity(monkeypatch):
  real = aot.parse_topology
  monkeypatch.setattr(aot, "parse_topology", lambda name: dataclasses.replace(real(name), capacity_bytes=4096))
  code, out, err = run_main(TINY + ["--mesh", "2,2,2", "--what", "decode", "--methods", "ar"])
  assert code == 1, err  # does not fit: scripts can gate on the exit status
  assert "data=2 fsdp=2 tensor=2" in out
  assert "decode ar" in out and "DOES NOT FIT" in out and "4.00 KiB per device" in out


def test_compile_verdicts():
  lowered = lambda: jax.jit(lambda x: x @ x).lower(jax.ShapeDtypeStruct((64, 64), jnp.float32))
  fits = aot._compile("matmul", lowered, capacity=1 << 30)
  assert fits.fits is True and fits.headroom_bytes == (1 << 30) - fits.total_bytes and fits.total_bytes > 0
  assert aot._compile("matmul", lowered, capacity=1024).fits is False

  class OutOfMemory:
    def compile(self):
      raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 17.2G of 15.75G hbm.")

  report = aot._compile("big", OutOfMemory, capacity=16 << 30)
  assert report.fits is False and report.verdict == "DOES NOT FIT" and "17.2G of 15.75G" in report.note


def test_tpu_topologies():
  v4 = aot.parse_topology("v4-8")
  assert (v4.num_devices, v4.topology_name, v4.chip_config_name, v4.capacity_bytes) == (
    4,
    "v4:2x2x1",
    "megacore",
    32 << 30,
  )
  assert aot.parse_topology("v4-16").topology_name == "v4:2x2x2"
  assert aot.parse_topology("v4-128").wrap == (True, True, True)
  v5e = aot.parse_topology("v5e-8")
  assert (v5e.num_devices, v5e.topology_name, v5e.capacity_bytes) == (8, "v5e:2x4", 16 << 30)
  assert dataclasses.replace(aot.parse_topology("v5litepod-8"), name="v5e-8") == v5e
  assert aot.parse_topology("v5p-8").topology_name == "v5:2x2x1"
  assert aot.parse_topology("v6e-8").capacity_bytes == 32 << 30
  for bad in ("v4-7", "v5e-3", "tpu-8", "cpu:0"):
    with pytest.raises(SpecjaxError, match="--topology"):
      aot.parse_topology(bad)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu is installed here")
def test_tpu_topology_without_libtpu_says_so_plainly():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, "-m", "specjax.aot", "--target", "tiny", "--drafter", "tiny-drafter", "--topology", "v5e-8"],
    check=False,
    capture_output=True,
    text=True,
    cwd=REPO,
    env=env,
    timeout=120,
  )
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  assert "TPU compiler" in result.stderr and "not installed" in result.stderr and "jax[tpu]" in result.stderr
  assert result.stderr.startswith("specjax: error: ") and result.stderr.count("\n") == 1


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install 'jax[tpu]')")
def test_tpu_topology_compiles_with_libtpu(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  path = tmp_path / "v5e.json"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "specjax.aot",
      *TINY[:4],
      "--topology",
      "v5e-8",
      *TINY[6:],
      "--mesh",
      "2,2,2",
      "--methods",
      "sps",
      "--json",
      str(path),
    ],
    check=False,
    capture_output=True,
    text=True,
    cwd=REPO,
    env=env,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr
  report = json.loads(path.read_text())
  assert report["topology"]["devices"] == 8 and "v5" in report["topology"]["device_kind"]
  for p in report["programs"]:
    assert p["verdict"] == "FITS" and p["capacity_bytes"] == 16 << 30 and p["temp_bytes"] > 0


@pytest.mark.parametrize(
  "flags, named",
  [
    (["--mesh", "3,1,1"], "--mesh=3,1,1"),
    (["--mesh", "1,2"], "--mesh='1,2'"),
    (["--target", "vicuna-70b"], "--target='vicuna-70b'"),
    (["--topology", "v9-8"], "--topology='v9-8'"),
    (["--topology", "cpu:64"], "--topology=cpu:64"),
    (["--train_batch", "10", "--grad_accumulation", "4"], "--train_batch=10"),
    (["--what", "serve"], "--what="),
    (["--prompt_len", "100"], "--prompt_len=100"),
    (["--bogus"], "unrecognized arguments"),
  ],
)
def test_mistakes_name_the_flag(flags, named):
  code, out, err = run_main(TINY + flags)
  assert code == 2 and out == ""
  assert err.startswith("specjax: error: ") and named in err, err


@pytest.mark.parametrize("method", ["sps", "ar"])
def test_decoder_lower_is_the_program_generate_runs(method):
  """aot compiles `Decoder.lower`: the same LoopSpec, inputs (shapes, dtypes, shardings) and
  program text as a real call of generate on the mesh."""
  from specjax.decoding.decoder import Decoder
  from specjax.decoding.sampling import SamplingMode
  from specjax.sharding import make_mesh
  from tests.helpers import random_model, tiny_config

  mesh = make_mesh((1, -1, 1))
  target = random_model(tiny_config(), seed=0)
  drafter = random_model(tiny_config(num_layers=1), seed=1) if method == "sps" else None
  decoder = Decoder(target, drafter, method=method, gamma=3, max_new_tokens=6, batch_size=8, mesh=mesh)
  real, seen = decoder._program, {}

  def recording(spec):
    program = real(spec)

    def call(ts, ds, x):
      seen["spec"], seen["x"] = spec, x
      return program(ts, ds, x)

    return call

  decoder._program = recording
  decoder.generate([[5, 6, 7, 8, 9], [3, 4]], eos_id=-1)
  decoder._program = real
  mode = SamplingMode(greedy=True)
  assert seen["spec"] == decoder.loop_spec(5, mode)
  abstract = decoder.abstract_inputs(5, mode)
  for a, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(seen["x"])):
    assert (a.shape, a.dtype) == (x.shape, x.dtype)
    assert a.sharding.is_equivalent_to(x.sharding, len(a.shape)), (a.sharding, x.sharding)
  called = real(seen["spec"]).lower(decoder.target_state, decoder.drafter_state, seen["x"]).as_text()
  assert decoder.lower(5, mode).as_text() == called
