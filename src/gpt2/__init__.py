"""GPT-2 on TensorFlow 2: OpenAI's checkpoints as they are, GPT-2's own tokenizer, fast sampling.

    import gpt2
    model = gpt2.load("124M")
    print(model.generate("The river", length=40, seed=1)[0])
"""
import os
import sys


def _start_tensorflow_quietly():
    """Import TensorFlow and find its devices with stderr silenced.

    Its C++ start-up lines (CUDA probing on a machine without a GPU, CPU features) are noise to
    someone generating text; errors after start-up are still shown.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf
        tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


_start_tensorflow_quietly()

from .api import GPT2, load  # noqa: E402
from .errors import GPT2Error  # noqa: E402

__all__ = ["GPT2", "GPT2Error", "load"]
