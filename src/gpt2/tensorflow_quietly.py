"""Importing this module imports TensorFlow and finds its devices with stderr silenced.

TensorFlow's C++ start-up lines (CUDA probing on a machine without a GPU, CPU features) are noise
to someone generating text; errors after start-up are still shown. gpt2.api imports this first.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.stderr.flush()
_saved, _devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
os.dup2(_devnull, 2)
try:
    import tensorflow as tf

    tf.config.list_physical_devices()
finally:
    os.dup2(_saved, 2)
    os.close(_saved)
    os.close(_devnull)
