"""The weights of OpenAI's GPT-2 model folders: read them into a params tree, write one back.

The weights are a TensorFlow checkpoint (model.ckpt.*) whose variables are named `model/wte`,
`model/wpe`, `model/h{i}/ln_1/g`, `model/h{i}/attn/c_attn/w`, ... and `model/ln_f/b`. The rest of
a folder (its names, hparams.json, the vocabulary files) is gpt2.folders' job.
"""
import concurrent.futures
import itertools
import os

import numpy as np
import tensorflow as tf

from .errors import GPT2Error
from .folders import CKPT_PREFIX, checkpoint_files, read_error, write_hparams



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


def read_checkpoint(model_dir, hparams, read_ahead=False):
    """Yields (name, float32 tensor) for each variable of the folder's checkpoint, one at a time, in
    variable_shapes' order, after checking that the checkpoint is whole and has this model's shapes.
    A linear layer's w comes as [n_in, n_out] (the checkpoint's [1, n_in, n_out]).

    read_ahead: read the next block in a thread while the caller works on this one; it then holds
    two blocks at a time, and loading takes less time: the next read overlaps this block's work.
    """
    prefix = os.path.join(model_dir, CKPT_PREFIX)
    shapes = variable_shapes(hparams)
    index_file, data_file = checkpoint_files(model_dir)
    for path in (index_file, data_file):
        try:  # TensorFlow would call an unreadable file damaged
            open(path, "rb").close()
        except OSError as e:
            raise read_error(path, e) from e
    try:
        reader = tf.train.load_checkpoint(prefix)
        stored = reader.get_variable_to_shape_map()
        # Both ways: a model variable that hparams.json does not ask for (n_layer 1 against a 2-layer
        # checkpoint) would otherwise be left out silently. Other variables (a training step count,
        # an optimizer's slots) are no part of the model.
        unasked = sorted(name for name in stored if name.startswith("model/") and name not in shapes)
        if unasked:
            listed = ", ".join(unasked[:3]) + (", ..." if len(unasked) > 3 else "")
            raise GPT2Error(f"{prefix} has {len(unasked)} model variables that hparams.json does not account for "
                            f"({listed}): the folder mixes files of different models, download it again")
        for name, shape in shapes.items():
            if name not in stored:
                raise GPT2Error(f"{prefix} has no variable {name}: it is not a GPT-2 checkpoint of this "
                                f"model, download the model again")
            if list(stored[name]) != shape:
                raise GPT2Error(f"{prefix}: {name} has shape {list(stored[name])} but hparams.json asks for "
                                f"{shape}: the folder mixes files of different models, download it again")
        needed = sum(int(np.prod(shape)) * 4 for shape in shapes.values())
        if os.path.getsize(data_file) < needed:
            raise GPT2Error(f"{data_file} is truncated ({os.path.getsize(data_file)} of at least {needed} bytes): "
                            "download the model again")
        # Read straight into TensorFlow tensors (no NumPy copy, so loading needs the weights' bytes
        # once), a block at a time: one read per tensor was much slower than one read of many, and
        # 1558M's float32 weights are never all in memory.
        groups = [list(zip(*group))
                  for _, group in itertools.groupby(shapes.items(), key=lambda item: item[0].split("/")[1])]

        def read(names):
            return tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                                        dtypes=[tf.float32] * len(names))

        def reads():
            """Each group's tensors in turn. With read_ahead, the next group is read in a thread while
            the caller works on this one: each TensorFlow op lets go of the interpreter while it runs."""
            if not read_ahead:
                yield from (read(names) for names, _ in groups)
                return
            with concurrent.futures.ThreadPoolExecutor(max_workers=1) as reader:
                pending = reader.submit(read, groups[0][0])
                for names, _ in groups[1:]:
                    values = pending.result()
                    pending = reader.submit(read, names)
                    yield values
                yield pending.result()

        for (names, group_shapes), values in zip(groups, reads()):
            for name, shape, value in zip(names, group_shapes, values):
                if len(shape) == 3:
                    value = tf.reshape(value, shape[1:])  # [1, n_in, n_out] -> [n_in, n_out], same buffer
                yield name, value
            del values, value
    except tf.errors.OpError as e:
        raise GPT2Error(f"cannot read the checkpoint {prefix} ({e.message.splitlines()[0]}): "
                        "it is damaged, download the model again") from e


def split_name(name):
    """(block number or None, name within it) of an OpenAI variable name: the one place that reads them.

    "model/h3/attn/c_attn/w" -> (3, "attn/c_attn/w"); "model/ln_f/g" -> (None, "ln_f/g").
    """
    parts = name.split("/", 2)
    if parts[1].startswith("h") and parts[1][1:].isdigit():
        return int(parts[1][1:]), parts[2]
    return None, "/".join(parts[1:])


def tree_node(params, block, name):
    """(the dict that holds weight `name` of `block` (None: outside the blocks) in a params tree,
    its key there), making dicts on the way.

    (3, "attn/c_attn/w") -> (params["h"][3]["attn"]["c_attn"], "w").
    """
    node, parts = params if block is None else params["h"][block], name.split("/")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    return node, parts[-1]


def checkpoint_variables(params, hparams):
    """{OpenAI name: float32 array} of a params tree: the inverse of load_params' folding and reshaping."""
    variables = {}
    for name, shape in variable_shapes(hparams).items():
        node, key = tree_node(params, *split_name(name))
        if len(shape) == 3 or (key == "b" and "w" in node):  # a linear layer's w [1, n_in, n_out] or b [n_out]
            w = np.asarray(tf.cast(node["w"], tf.float32))  # [n_in + 1, n_out]
            value = w[:-1][None] if key == "w" else w[-1]
        else:
            value = np.asarray(tf.cast(node[key], tf.float32))
        variables[name] = value
    return variables


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
    write_hparams(model_dir, hparams)


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
