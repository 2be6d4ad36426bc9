"""colabs/quickstart.ipynb runs end to end on a CPU in its tiny mode (SPECJAX_QUICKSTART_TINY=1:
tiny random-weight models, two drafter training steps, a few tokens), in a Jupyter kernel of this
interpreter, from colabs/."""

import json
import os
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat", reason="needs specjax[test] (nbformat, nbclient, ipykernel)")
nbclient = pytest.importorskip("nbclient", reason="needs specjax[test] (nbformat, nbclient, ipykernel)")
pytest.importorskip("ipykernel", reason="needs specjax[test] (nbformat, nbclient, ipykernel)")

COLABS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colabs")
NOTEBOOK = os.path.join(COLABS, "quickstart.ipynb")
KERNEL = "specjax-test-python"
PROBE = "import sys; print('KERNEL_PYTHON=' + sys.executable)"


def _outputs(nb):
  for index, cell in enumerate(nb.cells):
    for output in cell.get("outputs", []):
      yield index, output


def _texts(output) -> list[str]:
  """Printed text and every text mime type of a display/result output."""
  if output.get("output_type") == "stream":
    return [output.get("text", "")]
  return [value for mime, value in output.get("data", {}).items() if mime.startswith("text/")]


def test_stored_notebook_is_clean():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert code and all(not cell.outputs and cell.execution_count is None for cell in code), (
    "store the notebook without outputs"
  )


def test_quickstart_runs_end_to_end_on_cpu(tmp_path, monkeypatch):
  # A kernelspec naming this interpreter, first on JUPYTER_PATH: a `python3` kernel registered
  # elsewhere (a user's, the system's) could otherwise start a Python without jax.
  spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(
    json.dumps(
      {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "specjax test",
        "language": "python",
      }
    )
  )
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("SPECJAX_QUICKSTART_TINY", "1")
  monkeypatch.setenv("SPECJAX_QUICKSTART_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))

  nb = nbformat.read(NOTEBOOK, as_version=4)
  nb.cells.insert(0, nbformat.v4.new_code_cell(PROBE))
  client = nbclient.NotebookClient(
    nb, kernel_name=KERNEL, timeout=600, startup_timeout=120, resources={"metadata": {"path": COLABS}}
  )
  start = time.perf_counter()
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"a notebook cell failed:\n{e}")
  seconds = time.perf_counter() - start
  print(f"quickstart (tiny) executed in {seconds:.0f} s")

  errors = [(i, o.get("ename"), o.get("evalue")) for i, o in _outputs(nb) if o.get("output_type") == "error"]
  assert not errors, errors
  assert f"KERNEL_PYTHON={sys.executable}" in "".join(nb.cells[0].outputs[0].text), nb.cells[0].outputs
  texts = "\n".join(t for _, o in _outputs(nb) for t in _texts(o))
  assert "mode: tiny (test)" in texts
  assert "drafter: 2 steps in" in texts  # the trainer ran (the target keeps its random weights)
  assert "identical to plain decoding token for token" in texts
  # The acceptance table: the paper-layout markdown (methods x languages, "speedup (τ)") and the per-run one.
  markdown = "\n".join(o["data"]["text/markdown"] for _, o in _outputs(nb) if "text/markdown" in o.get("data", {}))
  for row in ("Plain decoding", "Prompt lookup (PLD)", "SpS, general drafter", "| De |", "| Ja |", "acceptance rate"):
    assert row in markdown, (row, markdown)
  images = [o for _, o in _outputs(nb) if "image/png" in o.get("data", {})]
  assert len(images) == 2, [sorted(o.get("data", {})) for _, o in _outputs(nb)]
