import atexit
import os
import shutil
import subprocess
import tempfile

# XLA programs compiled by the tests (and the scripts they run) go to a folder of this session,
# not to the user's cache; set before gpt2 starts TensorFlow.
os.environ.setdefault("GPT2_XLA_CACHE", tempfile.mkdtemp(prefix="gpt2-xla-"))
atexit.register(shutil.rmtree, os.environ["GPT2_XLA_CACHE"], ignore_errors=True)

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from gpt2.weights import load_params  # noqa: E402
from gpt2.folders import read_hparams  # noqa: E402
from gpt2.model import forward, logits  # noqa: E402
from gpt2.testing import make_model_folder  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A factory-made model folder models/tiny (n_ctx 128, 2 layers, a 657-token vocabulary)."""
    models_dir = tmp_path_factory.mktemp("models")
    make_model_folder(models_dir / "tiny")
    return models_dir / "tiny"


@pytest.fixture(scope="session")
def model(tiny_model):
    """(hparams, params) of the tiny model."""
    hparams = read_hparams(tiny_model)
    return hparams, load_params(tiny_model, hparams)


@pytest.fixture(scope="session")
def full_logits(model):
    """A function: the model's logits [len(tokens), n_vocab] for a token list, in one pass from scratch."""
    hparams, params = model

    def compute(tokens):
        return logits(params, forward(params, hparams, tf.constant([tokens])))[0].numpy()

    return compute


@pytest.fixture
def small_filesystem(tmp_path):
    """A 256 KiB tmpfs at tmp_path/small, filled up to its last 4 KiB page; skipped where it cannot be mounted."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (it needs root): {result.stderr.strip()}")
    try:
        stats = os.statvfs(mount)
        (mount / "filler").write_bytes(b"x" * (stats.f_bavail * stats.f_frsize - 4096))
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)
