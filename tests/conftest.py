import pytest
import tensorflow as tf

from gpt2.checkpoint import load_params
from gpt2.folders import read_hparams
from gpt2.model import forward, logits
from gpt2.testing import make_model_folder


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
