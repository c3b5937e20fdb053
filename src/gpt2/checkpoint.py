"""OpenAI's GPT-2 model folders: find one, check it, read its weights, and write one.

A model folder holds, exactly as OpenAI publishes it:
    checkpoint, hparams.json, model.ckpt.index, model.ckpt.data-00000-of-00001, model.ckpt.meta,
    encoder.json, vocab.bpe
The weights are a TensorFlow checkpoint whose variables are named `model/wte`, `model/wpe`,
`model/h{i}/ln_1/g`, `model/h{i}/attn/c_attn/w`, ... and `model/ln_f/b`.
"""
import json
import os

import numpy as np
import tensorflow as tf

from .errors import GPT2Error
from .model import HParams

# OpenAI's four released models and their shapes.
OPENAI_HPARAMS = {
    "124M": HParams(n_embd=768, n_head=12, n_layer=12),
    "355M": HParams(n_embd=1024, n_head=16, n_layer=24),
    "774M": HParams(n_embd=1280, n_head=20, n_layer=36),
    "1558M": HParams(n_embd=1600, n_head=25, n_layer=48),
}
MODEL_NAMES = tuple(OPENAI_HPARAMS)
LEGACY_NAMES = {"117M": "124M", "345M": "355M"}  # OpenAI renamed these two in 2019
MODEL_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
               "model.ckpt.index", "model.ckpt.meta", "vocab.bpe")
# The files that loading reads (the meta graph and the `checkpoint` pointer are not needed).
REQUIRED_FILES = ("hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001", "encoder.json", "vocab.bpe")
CKPT_PREFIX = "model.ckpt"


def default_models_dir():
    """Where model folders live: $GPT2_MODELS_DIR, else ./models as in the original."""
    return os.environ.get("GPT2_MODELS_DIR") or "models"


def canonical_name(model_name):
    """124M for 117M and 355M for 345M; other names unchanged."""
    return LEGACY_NAMES.get(str(model_name), str(model_name))


def find_model_dir(model_name, models_dir=None):
    """The folder of `model_name` under `models_dir`, checked to hold the files loading needs.

    `model_name` is one of OpenAI's names (legacy names accepted) or any folder in `models_dir`,
    such as a fine-tuned model.
    """
    models_dir = models_dir or default_models_dir()
    model_name = str(model_name)
    path = os.path.join(models_dir, model_name)
    if not os.path.isdir(path):
        path = os.path.join(models_dir, canonical_name(model_name))
    if not os.path.isdir(path):
        if canonical_name(model_name) in MODEL_NAMES:
            raise GPT2Error(f"model {model_name} is not in {models_dir}: "
                            f"run `python download_model.py {canonical_name(model_name)}` to fetch it")
        raise GPT2Error(f"unknown model {model_name!r}: use one of {', '.join(MODEL_NAMES)} "
                        f"or the name of a model folder in {models_dir}")
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise GPT2Error(f"{path} is missing {', '.join(missing)}: download the model again "
                        f"(`python download_model.py {model_name}`)")
    return path


def read_hparams(model_dir):
    """The HParams of a model folder, from its hparams.json."""
    path = os.path.join(model_dir, "hparams.json")
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
        return HParams(**{name: int(values[name]) for name in HParams._fields})
    except (ValueError, KeyError, TypeError) as e:
        raise GPT2Error(f"{path} is damaged ({e.__class__.__name__}: {e}): download the model again") from None


def variable_shapes(hparams):
    """Every variable of a GPT-2 checkpoint with its shape, in OpenAI's names."""
    n_embd, n_vocab, n_ctx = hparams.n_embd, hparams.n_vocab, hparams.n_ctx
    shapes = {"model/wte": [n_vocab, n_embd], "model/wpe": [n_ctx, n_embd]}
    for i in range(hparams.n_layer):
        block = {
            "ln_1/g": [n_embd], "ln_1/b": [n_embd],
            # OpenAI stored the linear layers as 1x1 convolutions: w is [1, n_in, n_out].
            "attn/c_attn/w": [1, n_embd, 3 * n_embd], "attn/c_attn/b": [3 * n_embd],
            "attn/c_proj/w": [1, n_embd, n_embd], "attn/c_proj/b": [n_embd],
            "ln_2/g": [n_embd], "ln_2/b": [n_embd],
            "mlp/c_fc/w": [1, n_embd, 4 * n_embd], "mlp/c_fc/b": [4 * n_embd],
            "mlp/c_proj/w": [1, 4 * n_embd, n_embd], "mlp/c_proj/b": [n_embd],
        }
        shapes.update({f"model/h{i}/{name}": shape for name, shape in block.items()})
    shapes.update({"model/ln_f/g": [n_embd], "model/ln_f/b": [n_embd]})
    return shapes


DTYPES = ("float32", "float16", "bfloat16")


def check_dtype(dtype):
    if dtype not in DTYPES:
        raise GPT2Error(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")


def load_params(model_dir, hparams, dtype="float32"):
    """The weights of a model folder as a tree that mirrors the checkpoint's names.

    params["wte"], params["wpe"], params["h"][i]["attn"]["c_attn"]["w"], ..., params["ln_f"]["g"];
    the linear layers' w are [n_in + 1, n_out]: the checkpoint's [1, n_in, n_out] with the layer's
    bias appended as the last row (see gpt2.model.linear). `dtype` is one of
    DTYPES: the checkpoint's float32, or half the memory and bytes per step in float16 or bfloat16.
    """
    check_dtype(dtype)
    prefix = os.path.join(model_dir, CKPT_PREFIX)
    shapes = variable_shapes(hparams)
    try:
        reader = tf.train.load_checkpoint(prefix)
        stored = reader.get_variable_to_shape_map()
        for name, shape in shapes.items():
            if name not in stored:
                raise GPT2Error(f"{prefix} has no variable {name}: it is not a GPT-2 checkpoint of this "
                                f"model, download the model again")
            if list(stored[name]) != shape:
                raise GPT2Error(f"{prefix}: {name} has shape {list(stored[name])} but hparams.json asks for "
                                f"{shape}: the folder mixes files of different models, download it again")
        data_file = prefix + ".data-00000-of-00001"
        needed = sum(int(np.prod(shape)) * 4 for shape in shapes.values())
        if os.path.getsize(data_file) < needed:
            raise GPT2Error(f"{data_file} is truncated ({os.path.getsize(data_file)} of at least {needed} bytes): "
                            "download the model again")
        params = {"h": [{} for _ in range(hparams.n_layer)]}
        for name, shape in shapes.items():
            # Read straight into a TensorFlow tensor: no NumPy copy, so loading needs the weights' bytes once.
            [value] = tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=[name], shape_and_slices=[""],
                                           dtypes=[tf.float32])
            if len(shape) == 3:
                value = tf.reshape(value, shape[1:])  # [1, n_in, n_out] -> [n_in, n_out], same buffer
            value = tf.cast(value, dtype)  # one tensor at a time: the float32 copy is freed at once
            node, parts = params, name.split("/")[1:]  # "model/h3/attn/c_attn/w" -> h, 3, attn, c_attn, w
            if parts[0].startswith("h") and parts[0][1:].isdigit():
                node, parts = params["h"][int(parts[0][1:])], parts[1:]
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
            del value
            if set(node) == {"w", "b"}:
                # A linear layer's w and b are both read: the bias becomes w's last row (see
                # gpt2.model.linear) at once, so that the next layer's read reuses the memory
                # of this w instead of leaving it unused in the process.
                node["w"] = tf.concat([node["w"], node.pop("b")[None]], axis=0)
    except tf.errors.OpError as e:
        raise GPT2Error(f"cannot read the checkpoint {prefix} ({e.message.splitlines()[0]}): "
                        "it is damaged, download the model again") from None
    return params


def write_checkpoint(model_dir, hparams, variables):
    """Write `variables` ({OpenAI name: array}) as model_dir/model.ckpt.* and hparams.json.

    The files are the same kind that OpenAI published: a V2 checkpoint bundle, the `checkpoint`
    pointer file, a meta graph, and hparams.json.
    """
    os.makedirs(model_dir, exist_ok=True)
    shapes = variable_shapes(hparams)
    if set(shapes) != set(variables) or any(list(np.shape(variables[n])) != s for n, s in shapes.items()):
        raise ValueError("variables do not match the shapes of these hparams")
    names = list(shapes)
    prefix = os.path.join(model_dir, CKPT_PREFIX)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[np.asarray(variables[n], dtype=np.float32) for n in names])
    with open(os.path.join(model_dir, "checkpoint"), "w") as f:
        f.write(f'model_checkpoint_path: "{CKPT_PREFIX}"\nall_model_checkpoint_paths: "{CKPT_PREFIX}"\n')
    with open(prefix + ".meta", "wb") as f:
        f.write(_meta_graph(shapes))
    with open(os.path.join(model_dir, "hparams.json"), "w") as f:
        json.dump(hparams._asdict(), f, indent=2)


def _meta_graph(shapes):
    """A MetaGraphDef that lists the variables, standing in for OpenAI's (which nothing here reads)."""
    from tensorflow.core.framework import graph_pb2
    from tensorflow.core.protobuf import meta_graph_pb2

    graph = graph_pb2.GraphDef()
    for name, shape in shapes.items():
        node = graph.node.add(name=name, op="VariableV2")
        node.attr["dtype"].type = tf.float32.as_datatype_enum
        node.attr["shape"].shape.dim.extend(node.attr["shape"].shape.Dim(size=d) for d in shape)
    meta = meta_graph_pb2.MetaGraphDef(graph_def=graph)
    meta.meta_info_def.tensorflow_version = tf.__version__
    return meta.SerializeToString()
