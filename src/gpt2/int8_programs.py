"""Making int8's TensorFlow Lite programs (gpt2.int8 runs them): the only part of int8 that needs TensorFlow.

- A program is made once per shape, by TensorFlow Lite's converter, from a block written with
  stand-in weights (`template`); each block's program is a copy of it with the block's own
  quantized weights written over the stand-ins' bytes (`Template.fill`). So loading converts
  nothing per block, and quantizes one checkpoint tensor at a time (1558M never needs its float32
  weights in memory).
- The first load of a model keeps its programs in files in the cache folder (`store`), where
  gpt2.int8.open_stored opens them from then on.
"""
import contextlib
import glob
import json
import logging
import math
import os
import shutil
import struct
from typing import NamedTuple

import numpy as np

from . import tensorflow_start  # noqa: F401  (first: TensorFlow starts quietly)
from .cache import INT8_CHECKSUMS, MIN_FREE_BYTES, abandoned, int8_folder, prune, removed
from .errors import c_stderr_silenced
from .int8 import ARRAYS, VECTORS, piece_rows, version
from .model import attention_weights, gelu, layer_norm, merge_heads, split_heads
from .storage import checked, file_checksum, remove, with_checksum
from .weights import read_weights, weights_size

import tensorflow as tf  # after gpt2.tensorflow_start

# The linear layers of a block: (name, checkpoint name, [n_in, n_out] in units of n_embd).
LAYERS = (("c_attn", "attn/c_attn", (1, 3)), ("attn_proj", "attn/c_proj", (1, 1)),
          ("c_fc", "mlp/c_fc", (1, 4)), ("mlp_proj", "mlp/c_proj", (4, 1)))


def quantize(w):
    """w [n_in, n_out] float32 -> (q [n_out, n_in] int8, scale [n_out] float32), q * scale ~ w.T.

    One scale per output column, the largest magnitude to 127 (symmetric: zero stays zero), as
    TensorFlow Lite's kernels read it.
    """
    w = np.asarray(w, np.float32).T
    scale = np.abs(w).max(axis=1) / 127
    scale[scale == 0] = 1  # an all-zero column: any scale gives zeros
    return np.round(w / scale[:, None]).astype(np.int8), scale.astype(np.float32)


def dense(x, w, b=None):
    # [..., n_in] @ w [n_in, n_out] (+ b) -> [..., n_out], as one 2-D product (TensorFlow Lite's FULLY_CONNECTED)
    out = tf.matmul(tf.reshape(x, [-1, x.shape[-1]]), w)
    out = tf.reshape(out, tf.concat([tf.shape(x)[:-1], [w.shape[1]]], axis=0))
    return out if b is None else out + b


def attention_after(q, k, v, keys, values, pos, shared_keys, shared_values, n_shared):
    """Attention of tokens q, k, v [batch, n_head, seq, head_dim] that come after the n_shared positions
    that all rows share, cached once in shared_keys [n_head, head_dim, shared_len] and shared_values
    [n_head, shared_len, head_dim], then each row's own first pos[b] cached keys [batch, n_head,
    head_dim, cache_len] and values [batch, n_head, cache_len, head_dim] (later slots are ignored).

    The shared positions (several samples of one prompt) are one product broadcast over the rows,
    whose rows read them from the processor's caches: at 8 rows with 768 shared slots a step took
    about as long as with the rows folded into one product (4 transposes more a block), and half as
    long as with a cache of 768 slots per row. The cache is never joined with the new tokens' keys
    and values: that copied the whole cache at every step (with 8 rows and 384 slots, as many bytes
    as 124M's int8 weights). (Keys are cached transposed; values transposed instead, or neither,
    measured the same.)
    """
    shared_len, cache_len, seq = tf.shape(shared_keys)[2], tf.shape(keys)[3], tf.shape(q)[2]
    shared = tf.matmul(q, shared_keys)  # [batch, n_head, seq, shared_len]
    past = tf.matmul(q, keys)  # [batch, n_head, seq, cache_len]
    new = tf.matmul(q, k, transpose_b=True)  # [batch, n_head, seq, seq]
    query = tf.range(seq)
    shared_visible = tf.broadcast_to(tf.range(shared_len) < n_shared, tf.shape(shared))
    past_visible = tf.broadcast_to(tf.range(cache_len)[None, None, None, :] < pos[:, None, None, None],
                                   tf.shape(past))
    new_visible = tf.broadcast_to((query[None, :] <= query[:, None])[None, None], tf.shape(new))
    probs = attention_weights(tf.concat([shared, past, new], axis=-1) / math.sqrt(q.shape[-1]),
                              tf.concat([shared_visible, past_visible, new_visible], axis=-1), tf.float32)
    shared_probs, past_probs, new_probs = tf.split(probs, tf.stack([shared_len, cache_len, seq]), axis=-1)
    return tf.matmul(shared_probs, shared_values) + tf.matmul(past_probs, values) + tf.matmul(new_probs, v)


class Template(NamedTuple):
    """A converted program with stand-in weights, and where in its bytes each weight matrix lies."""
    program: bytes
    places: dict  # name -> (offset of the int8 [n_out, n_in] data, offset of its [n_out] float32 scales)

    def fill(self, weights):
        """The program with `weights` (name -> quantize's (q, scale)) written over the stand-ins."""
        program = bytearray(self.program)
        for name, (q, scale) in weights.items():
            data, scales = self.places[name]
            program[data:data + q.nbytes] = q.tobytes()
            program[scales:scales + scale.nbytes] = scale.tobytes()
        return bytes(program)


def stand_ins(shapes):
    """Stand-in weights [n_in, n_out] for the matrices in `shapes` (name -> [n_out, n_in], each shape
    different), to build in the function that `template` converts.

    Each is one number filled in: the converter keeps it as that number until it writes the int8
    program. (Random stand-ins made it hold many bytes a weight: converting 1558M's block needed
    gigabytes.) Their signs alternate, so that no two of the same size quantize to the same
    bytes, which the converter would store once for both.
    """
    return {name: tf.fill(shape[::-1], 0.5 if i % 2 == 0 else -0.5) for i, (name, shape) in enumerate(shapes.items())}


def template(function, shapes):
    """Convert the tf.function `function`, whose weights are the `stand_ins` of `shapes`, to a
    TensorFlow Lite program with int8 weights."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        # Without the trackable object that the converter asks for (it warns): with one, its newer
        # path makes programs that XNNPACK cannot resize.
        converter = tf.lite.TFLiteConverter.from_concrete_functions([function.get_concrete_function()])
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # int8 weights, one scale per output column
        with c_stderr_silenced():  # the converter's progress lines
            program = converter.convert()
    finally:
        absl_logger.setLevel(level)
    return Template(program, find_weights(program, shapes))


def find_weights(program, shapes):
    """Where each int8 weight matrix of `program` (name -> its [n_out, n_in] shape) keeps its data and scales."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(program, 0)
    graph = model.Subgraphs(0)
    base = np.frombuffer(program, np.uint8).ctypes.data
    places = {}
    for i in range(graph.TensorsLength()):
        tensor = graph.Tensors(i)
        shape = tuple(tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
        name = next((n for n, s in shapes.items() if s == shape), None)
        if name is None or tensor.Type() != schema.TensorType.INT8:
            continue
        data = model.Buffers(tensor.Buffer()).DataAsNumpy()
        scales = tensor.Quantization().ScaleAsNumpy()
        if data.size != np.prod(shape) or scales.size != shape[0] or tensor.Quantization().QuantizedDimension() != 0:
            raise RuntimeError(f"TensorFlow Lite's converter laid out the {name} weights unexpectedly")
        places[name] = (data.ctypes.data - base, scales.ctypes.data - base)
    if set(places) != set(shapes):
        raise RuntimeError(f"TensorFlow Lite's converter kept {sorted(set(shapes) - set(places))} in float32")
    if len({data for data, _ in places.values()}) != len(places):  # one buffer for two: `fill` would mix them
        raise RuntimeError("TensorFlow Lite's converter stored two weight matrices as one")
    return places


def block_shapes(hparams):
    """name -> [n_out, n_in] of a block's weight matrices, as its program stores them."""
    return {name: (b * hparams.n_embd, a * hparams.n_embd) for name, _, (a, b) in LAYERS}


def head_shapes(hparams):
    """The same for a piece of the output layer: piece_rows tokens' embeddings."""
    return {"wte": (piece_rows(hparams), hparams.n_embd)}


def block_template(hparams):
    """The Template of one block's step: x [batch, seq, n_embd] of tokens that come after n_shared
    positions that all rows share (shared_keys [n_head, head_dim, shared_len], shared_values [n_head,
    shared_len, head_dim]), then each row's pos[b] own cached keys [batch, n_head, head_dim,
    cache_len] and values [batch, n_head, cache_len, head_dim] -> the block's output (same shape as
    x) and the tokens' own keys and values [batch, n_head, seq, head_dim]. Its other inputs are the
    block's VECTORS."""
    n_embd, n_head, shapes = hparams.n_embd, hparams.n_head, block_shapes(hparams)
    head_dim = n_embd // n_head
    signature = [tf.TensorSpec([None, None, n_embd], name="x"), tf.TensorSpec([None, n_head, head_dim, None], name="keys"),
                 tf.TensorSpec([None, n_head, None, head_dim], name="values"), tf.TensorSpec([None], tf.int32, name="pos"),
                 tf.TensorSpec([n_head, head_dim, None], name="shared_keys"),
                 tf.TensorSpec([n_head, None, head_dim], name="shared_values"), tf.TensorSpec([], tf.int32, name="n_shared")]
    sizes = {"c_attn_b": 3 * n_embd, "c_fc_b": 4 * n_embd}
    signature += [tf.TensorSpec([sizes.get(name, n_embd)], name=name) for name in VECTORS]

    @tf.function(input_signature=signature, autograph=False)
    def step(x, keys, values, pos, shared_keys, shared_values, n_shared, *vectors):
        p, w = dict(zip(VECTORS, vectors)), stand_ins(shapes)
        qkv = dense(layer_norm(x, {"g": p["ln_1_g"], "b": p["ln_1_b"]}), w["c_attn"], p["c_attn_b"])
        q, k, v = (split_heads(t, n_head) for t in tf.split(qkv, 3, axis=-1))
        attention = attention_after(q, k, v, keys, values, pos, shared_keys, shared_values, n_shared)
        x = x + dense(merge_heads(attention), w["attn_proj"], p["attn_proj_b"])
        h = gelu(dense(layer_norm(x, {"g": p["ln_2_g"], "b": p["ln_2_b"]}), w["c_fc"], p["c_fc_b"]))
        return x + dense(h, w["mlp_proj"], p["mlp_proj_b"]), k, v

    return template(step, shapes)


def head_template(hparams):
    """The Template of one piece of the output layer: hidden states h [batch, seq, n_embd] (before
    ln_f) -> the logits [batch, seq, rows] of piece_rows(hparams) tokens, through their embeddings
    ("wte", their rows quantized); its other inputs are ln_f_g, ln_f_b."""
    n_embd, shapes = hparams.n_embd, head_shapes(hparams)

    @tf.function(input_signature=[tf.TensorSpec([None, None, n_embd], name="h"),
                                  tf.TensorSpec([n_embd], name="ln_f_g"), tf.TensorSpec([n_embd], name="ln_f_b")],
                 autograph=False)
    def output(h, g, b):
        return dense(layer_norm(h, {"g": g, "b": b}), stand_ins(shapes)["wte"])

    return template(output, shapes)


TEMPLATES = {"block": (block_template, block_shapes), "head": (head_template, head_shapes)}


def cached_template(hparams, kind):
    """The Template of `kind` (see TEMPLATES), kept in the cache's int8 folder (gpt2.cache) for
    later loads: converting takes seconds, reading it milliseconds."""
    make, shapes = TEMPLATES[kind]
    folder = int8_folder()
    name = f"int8-{kind}-{hparams.n_embd}-{hparams.n_head}-{piece_rows(hparams)}-{version()}.tflite"
    path = folder and os.path.join(folder, name)
    if path and os.path.exists(path):
        try:
            with open(path, "rb") as f:
                program = checked(f.read())
            if program is not None:  # else cut off or changed: made again below
                return Template(program, find_weights(program, shapes(hparams)))
        except (OSError, RuntimeError, ValueError, IndexError, TypeError, struct.error):
            pass  # unreadable or damaged: made again below
    made = make(hparams)
    if path:
        try:
            temporary = f"{path}.{os.getpid()}.tmp"
            with open(temporary, "wb") as f:
                f.write(with_checksum(made.program))
            os.replace(temporary, path)  # whole or not at all
            for older in glob.glob(os.path.join(glob.escape(folder), "int8-*.tflite")):  # other versions', any size
                if not older.endswith(f"-{version()}.tflite"):
                    with contextlib.suppress(OSError):  # another process's load removed it first, or has it open
                        os.remove(older)
        except OSError:
            pass  # a read-only or full disk: the next load converts again
    return made


def quantized(model_dir, hparams, keep):
    """Read the checkpoint and quantize it one tensor at a time. Each program's bytes go to
    keep(name, bytes), which returns what Program takes (the bytes, or the path of a file of them).
    Returns ([(block program, its VECTORS)], [output layer programs], ARRAYS by name)."""
    block, head = cached_template(hparams, "block"), cached_template(hparams, "head")
    layers = {checkpoint_name + "/w": name for name, checkpoint_name, _ in LAYERS}
    vectors = {checkpoint_name: name for name, checkpoint_name in VECTORS.items()}
    block_read, arrays, blocks, pieces = {}, {}, [], []
    for weight in read_weights(model_dir, hparams):
        value = weight.value.numpy()
        if weight.name == "wte":  # [n_vocab, n_embd]: the output layer's [n_out, n_in], a piece at a time
            wte, wte_scale = np.empty(value.shape, np.int8), np.empty(len(value), np.float32)
            rows = piece_rows(hparams)
            for start in range(0, len(value), rows):
                q, scale = quantize(value[start:start + rows].T)
                wte[start:start + len(q)], wte_scale[start:start + len(q)] = q, scale
                if len(q) < rows:  # the last piece's rows after the vocabulary's end: zeros, cut off in `logits`
                    q = np.concatenate([q, np.zeros([rows - len(q), q.shape[1]], np.int8)])
                    scale = np.concatenate([scale, np.ones(rows - len(scale), np.float32)])
                pieces.append(keep(f"head{len(pieces)}", head.fill({"wte": (q, scale)})))
            arrays.update(wte=wte, wte_scale=wte_scale)
        elif weight.block is not None:  # the blocks come in order, each whole
            block_read[layers[weight.name] if weight.name in layers else vectors[weight.name]] = value
            if len(block_read) == len(LAYERS) + len(VECTORS):
                weights = {name: quantize(block_read.pop(name)) for name, _, _ in LAYERS}
                blocks.append((keep(f"block{len(blocks)}", block.fill(weights)), block_read))
                block_read = {}
        else:
            arrays[weight.name.replace("/", "_")] = value  # wpe, ln_f_g, ln_f_b
        del value, weight
    return blocks, pieces, arrays


def store(model_dir, hparams, folder):
    """Quantize the checkpoint into `folder`: a .tflite file per program, the ARRAYS as .npy files, the
    blocks' VECTORS in vectors.npz.

    First what no load will open again is removed: other versions' folders and the least recently
    used beyond the cache's size (gpt2.cache.prune), this model folder's older checkpoints' folders
    and abandoned temporary ones. Nothing is written where the disk would keep less than
    MIN_FREE_BYTES free. `folder` is whole or absent, also after a full disk, Ctrl-C or a
    power cut: it is written under another name, each file synced to the disk, and renamed.
    INT8_CHECKSUMS records each file's size and CRC-32, for open_stored to check.
    """
    parent = os.path.dirname(folder)
    version_and_model = os.path.basename(folder).rsplit("-", 1)[0] + "-"
    temporary = f"{folder}.{os.getpid()}.tmp"
    checksums = {}  # name -> (size, CRC-32), checked by open_stored before a file is used

    def write(name, save):
        path = os.path.join(temporary, name)
        with open(path, "wb") as f:
            save(f)
            f.flush()
            os.fsync(f.fileno())
        checksums[name] = file_checksum(path)
        return path

    try:
        os.makedirs(parent, exist_ok=True)
        prune(version())
        for name in os.listdir(parent):
            path = os.path.join(parent, name)
            with contextlib.suppress(FileNotFoundError):  # another process removed it first
                if abandoned(path):
                    remove(path)
                elif name.startswith(version_and_model) and not name.endswith(".tmp"):
                    removed(path)  # unless a live process has it open
        need = weights_size(model_dir) // 4 + MIN_FREE_BYTES  # int8: a quarter of float32
        if shutil.disk_usage(parent).free < need:
            return
        os.makedirs(temporary)
        blocks, _, arrays = quantized(model_dir, hparams,
                                      keep=lambda name, program: write(name + ".tflite", lambda f: f.write(program)))
        for name in ARRAYS:
            write(name + ".npy", lambda f: np.save(f, arrays[name]))
        write("vectors.npz", lambda f: np.savez(f, **{f"{i}/{name}": value for i, (_, vectors) in enumerate(blocks)
                                                       for name, value in vectors.items()}))
        write(INT8_CHECKSUMS, lambda f: f.write(json.dumps(checksums).encode()))
        os.rename(temporary, folder)
    except OSError:
        pass  # a full or read-only disk: load_int8 keeps the programs in memory
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
