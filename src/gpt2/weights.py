"""A model folder's weights by OpenAI's names, whatever the folder's format: the one way to open one.

`read_weights` yields each weight as a Weight: its block (None outside the blocks), its name in
OpenAI's checkpoint (within a block "attn/c_attn/w", "ln_1/g", ...; outside "wte", "wpe",
"ln_f/g", "ln_f/b"), and its float32 value, a linear layer's w as [n_in, n_out]. Everything that
loads a model reads it through here: `load_params` (the float weights' tree of gpt2.model) and
gpt2.int8's quantizer. Today's one format is OpenAI's TensorFlow checkpoint (gpt2.checkpoint);
another (Hugging Face's safetensors) is a reader of its own here, and nothing beyond changes.
"""
import os
from typing import NamedTuple, Optional

import tensorflow as tf

from .arguments import check_dtype
from .checkpoint import checkpoint_files, read_checkpoint, split_name, tree_node


class Weight(NamedTuple):
    block: Optional[int]  # None: outside the blocks
    name: str
    value: tf.Tensor  # float32


def read_weights(model_dir, hparams, read_ahead=False):
    """Yields a Weight for each of the folder's weights, one at a time, in OpenAI's order (wte, wpe,
    each block's, ln_f), after checking that they are whole and have this model's shapes.

    read_ahead: read the next block in a thread while the caller works on this one (see
    gpt2.checkpoint.read_checkpoint).
    """
    for name, value in read_checkpoint(model_dir, hparams, read_ahead):
        yield Weight(*split_name(name), value)


def weight_files(model_dir):
    """The paths of the files that the folder's weights are read from."""
    return list(checkpoint_files(model_dir))


def weights_size(model_dir):
    """Bytes of the folder's weight files (an OSError where one is missing)."""
    return sum(os.path.getsize(path) for path in weight_files(model_dir))


def load_params(model_dir, hparams, dtype="float32"):
    """The weights of a model folder as the tree of gpt2.model, which mirrors OpenAI's names.

    params["wte"], params["wpe"], params["h"][i]["attn"]["c_attn"]["w"], ..., params["ln_f"]["g"];
    the linear layers' w are [n_in + 1, n_out]: w [n_in, n_out] with the layer's bias appended as
    the last row (see gpt2.model.linear). `dtype` is one of DTYPES: the checkpoint's float32, or
    half the memory and bytes per step in float16 or bfloat16.
    """
    check_dtype(dtype)
    params = {"h": [{} for _ in range(hparams.n_layer)]}
    for weight in read_weights(model_dir, hparams, read_ahead=True):
        value = tf.cast(weight.value, dtype)  # one tensor at a time: the float32 copy is freed at once
        node, key = tree_node(params, weight.block, weight.name)
        node[key] = value
        del value, weight
        if set(node) == {"w", "b"}:
            # A linear layer's w and b are both read: the bias becomes w's last row (see
            # gpt2.model.linear) at once, so that the next layer's read reuses the memory
            # of this w instead of leaving it unused in the process.
            node["w"] = tf.concat([node["w"], node.pop("b")[None]], axis=0)
    return params
