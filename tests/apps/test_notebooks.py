"""The colab/ notebooks: committed without outputs, and each runs top to bottom on CPU in a fresh kernel of this
interpreter (the notebooks scale their sizes down on CPU; they use the real SmolLM2 package, hence `slow`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "colab").glob("*.ipynb"))
EXPECTED = ["01_quickstart", "02_gptq_awq_hqq", "03_qat", "04_kernels_and_checkpoints", "05_adapters"]
KERNEL = "jq-test-python"
PROBE = "import sys; print(sys.prefix); print(sys.executable)"


def test_the_five_notebooks_are_there():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_valid_and_stripped(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has outputs: strip them before committing"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count: strip it"
    assert "widgets" not in nb.metadata, f"{path.name}: widget state in the metadata; strip it"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    # Colab-only set-up is guarded, so the notebook runs unchanged anywhere else
    install = [c for c in nb.cells if c.cell_type == "code" and "%pip install" in c.source]
    assert install and all('if "google.colab" in sys.modules' in c.source for c in install)


def _kernel_manager(tmp: Path):
    """A kernel manager whose kernel runs this interpreter (the project's .venv), whatever kernelspecs the user
    has installed elsewhere."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    d = tmp / "kernels" / KERNEL
    d.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "jq test kernel", "language": "python"}
    (d / "kernel.json").write_text(json.dumps(spec))
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp / "kernels")]))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_cpu(path, tmp_path):
    from nbclient import NotebookClient

    before = path.read_bytes()
    colab_before = sorted(p.name for p in path.parent.iterdir())
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(PROBE))
    run_dir = tmp_path / "cwd"  # the kernel's working directory: nothing lands in the repository by accident
    run_dir.mkdir()
    # the test process's environment (tests/conftest.py: CPU, 8 fake devices, one OpenBLAS thread), CPU enforced
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OPENBLAS_NUM_THREADS": "1"}
    km = _kernel_manager(tmp_path)
    client = NotebookClient(nb, km=km, timeout=600, allow_errors=False, resources={"metadata": {"path": str(run_dir)}})
    try:
        client.execute(cleanup_kc=True, env=env)  # raises CellExecutionError naming the cell on any error
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)

    probe = "".join(o.get("text", "") for o in nb.cells[0].outputs).split()
    assert probe == [sys.prefix, sys.executable], f"the kernel ran {probe}, not this interpreter {sys.executable}"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert path.read_bytes() == before, "running the notebook changed the file"
    assert sorted(p.name for p in path.parent.iterdir()) == colab_before, "the notebook wrote into colab/"
