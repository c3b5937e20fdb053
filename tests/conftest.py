import pytest

from gpt2.testing import make_model_folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A factory-made model folder models/tiny (n_ctx 128, 2 layers, a 657-token vocabulary)."""
    models_dir = tmp_path_factory.mktemp("models")
    make_model_folder(models_dir / "tiny")
    return models_dir / "tiny"
