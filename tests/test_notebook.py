"""examples/quickstart.ipynb runs top to bottom with the bundled model.

The notebook runs in a kernel of this test's Python (the project's virtual
environment), through a kernel spec written to a temporary folder on JUPYTER_PATH, so
the test installs nothing outside that folder.
"""

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"
KERNEL_NAME = "tokviz-test"
CELL_TIMEOUT_SECONDS = 600


@pytest.fixture
def kernel_name(tmp_path, monkeypatch) -> str:
    """Write a kernel spec that starts this Python, in a folder Jupyter searches first."""
    from ipykernel.kernelspec import write_kernel_spec

    write_kernel_spec(tmp_path / "kernels" / KERNEL_NAME)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return KERNEL_NAME


def test_notebook_is_committed_without_outputs():
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    with_outputs = [index for index, cell in enumerate(notebook.cells) if cell.cell_type == "code" and (cell.outputs or cell.execution_count)]
    assert not with_outputs, f"clear the outputs of code cells {with_outputs} before committing"


def test_quickstart_notebook_runs(kernel_name):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Raises CellExecutionError, with the cell's source and traceback, when a cell fails.
    NotebookClient(notebook, kernel_name=kernel_name, timeout=CELL_TIMEOUT_SECONDS, resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    errors = [output for cell in code_cells for output in cell.outputs if output.output_type == "error"]
    assert not errors, f"cells raised: {[error.ename for error in errors]}"
    assert all(cell.execution_count for cell in code_cells), "every code cell must have run"

    images = [output for cell in code_cells for output in cell.outputs if "image/png" in output.get("data", {})]
    assert len(images) == 3, f"expected the heatmap, the step score plot and the method comparison as PNG outputs, got {len(images)}"

    text = "\n".join(_plain_text(cell) for cell in code_cells)
    assert "succeeded" in text, "the status cell must show the job's state"
    assert "quickstart-input-x-gradient" in text, "the cross-job query must list the second job"


def _plain_text(cell) -> str:
    parts = []
    for output in cell.outputs:
        if output.output_type == "stream":
            parts.append(output.text)
        elif "text/plain" in output.get("data", {}):
            parts.append(output["data"]["text/plain"])
    return "\n".join(parts)
