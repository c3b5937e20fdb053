"""A model folder's weights by OpenAI's names, whatever the folder's format: the one way to open one.

`read_weights` yields each weight as a Weight: its block (None outside the blocks), its name in
OpenAI's checkpoint (within a block "attn/c_attn/w", "ln_1/g", ...; outside "wte", "wpe",
"ln_f/g", "ln_f/b"), and its float32 value, a linear layer's w as [n_in, n_out]. Everything that
loads a model reads it through here: `load_params` (the float weights' tree of gpt2.model) and
gpt2.int8's quantizer. The formats: OpenAI's TensorFlow checkpoint (gpt2.checkpoint) and Hugging
Face's safetensors (gpt2.huggingface); gpt2.folders tells which a folder holds. `save_model`
writes a folder in either layout, or both.
"""
import os
import shutil
from typing import NamedTuple, Optional

import tensorflow as tf

from . import folders
from .arguments import check_dtype, must
from .checkpoint import checkpoint_variables, read_checkpoint, split_name, tree_node, write_checkpoint
from .encoder import write_vocabulary
from .errors import GPT2Error
from .folders import HUGGINGFACE_VOCAB_FILES, SAVE_FORMATS, VOCAB_FILES, check_replaceable, folder_format, weight_files
from .huggingface import read_safetensors, write_config, write_safetensors
from .storage import replace_folder, writing_name


class Weight(NamedTuple):
    block: Optional[int]  # None: outside the blocks
    name: str
    value: tf.Tensor  # float32


def read_weights(model_dir, hparams, read_ahead=False):
    """Yields a Weight for each of the folder's weights, one at a time, in OpenAI's order (wte, wpe,
    each block's, ln_f), after checking that they are whole and have this model's shapes.

    read_ahead: read the next block in a thread while the caller works on this one (see
    gpt2.checkpoint.read_checkpoint; safetensors are memory-mapped, read as each weight is asked for).
    """
    if folder_format(model_dir) == "huggingface":
        for name, value in read_safetensors(model_dir, hparams):
            yield Weight(*split_name(name), tf.convert_to_tensor(value))
            del value
        return
    for name, value in read_checkpoint(model_dir, hparams, read_ahead):
        yield Weight(*split_name(name), value)


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


def save_model(model_dir, hparams, params, encoder, write_more=None, save_format="openai"):
    """Write a params tree and an Encoder's vocabulary as the model folder `model_dir`: in OpenAI's
    layout, Hugging Face's, or both (save_format "openai", "huggingface", "both"; see gpt2.folders).

    The folder is written whole beside `model_dir`, then put in its place (gpt2.storage.replace_folder):
    a crash leaves the previous folder (or none), never a half-written one. A folder there that
    holds other files than a model's is not replaced: an ArgumentError says so before anything is
    written. `write_more(folder)`, if given, adds files to it first (a fine-tuning run's state).
    """
    if save_format not in SAVE_FORMATS:
        raise must("save_format", f"one of {', '.join(SAVE_FORMATS)}", save_format)
    model_dir = os.path.abspath(model_dir)
    check_replaceable(model_dir, "model_dir")
    writing = writing_name(model_dir)
    try:
        with folders.writing(model_dir):  # one writer at a time, after what a killed one left is repaired
            os.makedirs(writing)
            variables = checkpoint_variables(params, hparams)
            if save_format in ("openai", "both"):
                write_checkpoint(writing, hparams, variables)
                write_vocabulary(encoder, writing, VOCAB_FILES)
            if save_format in ("huggingface", "both"):
                write_safetensors(writing, variables)
                write_config(writing, hparams, encoder.eot_token)
                write_vocabulary(encoder, writing, HUGGINGFACE_VOCAB_FILES)
            del variables
            if write_more:
                write_more(writing)
            replace_folder(writing, model_dir)
    except (OSError, tf.errors.OpError) as e:  # a full disk, say
        shutil.rmtree(writing, ignore_errors=True)
        # TensorFlow's message ends "<file>; No space left on device [Op:SaveV2]": the reason alone
        reason = (e.strerror or e) if isinstance(e, OSError) else e.message.split(" [Op:")[0].rsplit("; ", 1)[-1]
        raise GPT2Error(f"cannot save {model_dir} ({reason}): free some space, or choose another folder; what was "
                        "there is kept as it was") from e
    except BaseException:
        shutil.rmtree(writing, ignore_errors=True)
        raise
    return model_dir
