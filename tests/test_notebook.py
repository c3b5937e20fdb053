"""The Colab notebook, run top to bottom in a real Jupyter kernel, downloading from a local mirror.

The kernel is a separate process that inherits the environment: GPT2_NOTEBOOK_SOURCE makes the
notebook use this checkout instead of pip-installing it, GPT2_BASE_URL points its download at a
`ModelMirror` serving a tiny factory-made model under the real name 124M, GPT2_MODELS_DIR is an
empty folder, and GPT2_NOTEBOOK_LENGTH keeps every sample short.
"""
import json
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from gpt2.folders import MODEL_FILES
from gpt2.cli import banner
from gpt2.testing import ModelMirror, make_model_folder

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "gpt2.ipynb"
LENGTH = 8
STEPS = 12


def code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def cell(nb, tag):
    """The code cell tagged `tag` (the notebook tags each of its code cells by what it does)."""
    [found] = [c for c in code_cells(nb) if tag in c.metadata.get("tags", [])]
    return found


def stream_text(cell, name="stdout"):
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream" and out.name == name)


def test_notebook_is_ready_for_colab():
    with open(NOTEBOOK, encoding="utf-8") as f:
        raw = json.load(f)
    nb = nbformat.reads(json.dumps(raw), as_version=4)
    nbformat.validate(nb)
    assert raw["nbformat"] == 4
    assert nb.metadata.accelerator == "GPU"
    assert nb.metadata.colab == {"provenance": [], "gpuType": "T4"}
    assert nb.metadata.kernelspec.name == "python3"
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    assert ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            "(https://colab.research.google.com/github/gpt2-tf2/gpt2/blob/main/notebooks/gpt2.ipynb)") in first.source
    for i, c in enumerate(nb.cells[1:], 1):  # every code cell comes after its explanation
        if c.cell_type == "code":
            assert nb.cells[i - 1].cell_type == "markdown", f"code cell {i} has no markdown before it"
            assert not c.outputs and c.execution_count is None, "the notebook is saved without outputs"
    source = "\n".join(c.source for c in code_cells(nb))
    assert "%tensorflow_version" not in source and "compat.v1" not in source
    assert 'model_name = "124M"  # @param ["124M", "355M", "774M", "1558M"]' in source
    for tag in ("install", "gpu", "choose", "load", "generate", "stream", "unconditional", "speed", "finetune",
                "finetune-plot", "finetune-generate", "finetune-drive", "finetune-resume", "serve"):
        cell(nb, tag)
    assert 'SOURCE = "/content/drive/MyDrive/gpt2"  # @param {type:"string"}' in source  # a Git URL, wheel or folder


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    mirror_root, models_dir, work = tmp_path / "mirror", tmp_path / "models", tmp_path / "work"
    make_model_folder(mirror_root / "124M")  # tiny, under a real name, so the notebook downloads it
    models_dir.mkdir()
    work.mkdir()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with ModelMirror(mirror_root) as mirror:
        for name, value in {"GPT2_BASE_URL": mirror.url, "GPT2_MODELS_DIR": str(models_dir),
                            "GPT2_NOTEBOOK_SOURCE": str(REPO), "GPT2_NOTEBOOK_MODEL": "124M",
                            "GPT2_NOTEBOOK_LENGTH": str(LENGTH), "GPT2_NOTEBOOK_STEPS": str(STEPS),
                            "TF_CPP_MIN_LOG_LEVEL": "3"}.items():
            monkeypatch.setenv(name, value)  # the kernel process inherits these
        started = time.perf_counter()
        # Raises CellExecutionError, with the traceback, if any cell fails.
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
        seconds = time.perf_counter() - started
    print(f"notebook ran in {seconds:.1f} s")

    for c in code_cells(nb):
        assert c.execution_count is not None
        assert not [out for out in c.outputs if out.output_type == "error"]

    # Install: the checkout's src/, not a pip install.
    assert f"gpt2 from {REPO / 'src' / 'gpt2'}" in stream_text(cell(nb, "install"))
    assert "sees these GPUs:" in stream_text(cell(nb, "gpu"))

    # Download: every file came over HTTP into GPT2_MODELS_DIR/124M, complete and unchanged.
    fetched = {name for method, name, *_ in mirror.requests if method == "GET"}
    assert fetched == set(MODEL_FILES)
    for name in MODEL_FILES:
        assert (models_dir / "124M" / name).read_bytes() == (mirror_root / "124M" / name).read_bytes()
    assert sorted(p.name for p in (models_dir / "124M").iterdir()) == sorted(MODEL_FILES)  # no .part left
    assert "Fetching model 124M" in stream_text(cell(nb, "load"), "stderr")
    assert "n_vocab=" in stream_text(cell(nb, "load"))

    # Generate: two samples under banners, each the prompt and its continuation.
    generated = stream_text(cell(nb, "generate"))
    assert banner(1) in generated and banner(2) in generated and banner(3) not in generated
    assert generated.count("The river ran past the old mill, and") == 2
    assert stream_text(cell(nb, "stream")).startswith("The river ran past the old mill, and")

    # Unconditional samples: the file in the kernel's working folder, four samples under banners.
    samples = (work / "samples.txt").read_text(encoding="utf-8")
    assert [line for line in samples.splitlines() if line.startswith("=" * 40)] == [banner(n) for n in range(1, 5)]
    assert f"Wrote 4 samples to {work / 'samples.txt'}" in stream_text(cell(nb, "unconditional"))

    # Speed: a tokens/s line per batch size, counting LENGTH tokens per sample.
    speed = stream_text(cell(nb, "speed"))
    assert f"batch_size=1: {LENGTH} tokens in " in speed and f"batch_size=4: {4 * LENGTH} tokens in " in speed
    assert speed.count("tokens/s") == 2

    # Fine-tuning: a run folder in OpenAI's layout, a loss per step, samples from it, and a second
    # call that goes on from the first one's last save.
    run_dir = models_dir / "mine"
    assert set(MODEL_FILES) <= {p.name for p in run_dir.iterdir()}
    assert f"The run is in {run_dir}" in stream_text(cell(nb, "finetune"))
    assert stream_text(cell(nb, "finetune-plot")).startswith("loss ")
    assert f"at step {STEPS}" in stream_text(cell(nb, "finetune-plot"))
    tuned = stream_text(cell(nb, "finetune-generate"))
    assert banner(1) in tuned and banner(2) in tuned
    assert "Not in Colab: the run stays in" in stream_text(cell(nb, "finetune-drive"))
    assert f"it has trained {STEPS + STEPS // 3} steps in all" in stream_text(cell(nb, "finetune-resume"))

    # The page: the server answered /health, and outside Colab the cell says where the page is.
    assert "The page is at http://127.0.0.1:" in stream_text(cell(nb, "serve"))
