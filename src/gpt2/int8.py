"""int8 weights on the CPU: GPT-2's decoding step run by TensorFlow Lite's XNNPACK kernels.

Decoding one token reads every weight once, so on a CPU its speed is the memory's bandwidth over
the weights' bytes; in int8 they are a quarter of float32's. XLA on the CPU has no fast int8
product (it converts the whole weight matrix to float32 first: slower than float32 itself), but
TensorFlow Lite's XNNPACK kernels multiply int8 weights directly ("dynamic range" quantization:
int8 weights with a float scale per output column, each input row quantized to int8 on the fly).

The model runs as small TensorFlow Lite programs, one per block and one per piece of the
output layer (see piece_rows):
- A program is made once per shape, by TensorFlow Lite's converter, from a block written with
  stand-in weights (`template`); each block's program is a copy of it with the block's own
  quantized weights written over the stand-ins' bytes (`Template.fill`). So loading converts
  nothing per block, and quantizes one checkpoint tensor at a time (1558M never needs its float32
  weights in memory).
- The first load of a model keeps its programs in files in the cache folder (`store`); loads run
  them from there (`open_stored`): later loads read no checkpoint, and each program's weights are
  in memory once, in XNNPACK's layout (see Program).
- Int8Engine is gpt2.engine's interface on these programs. The rows' keys and values stay in the
  block programs' input tensors between steps; a step adds the new tokens' ones in place
  (`Int8Engine.forward`), so no cache is copied. The programs hold one engine's caches at a time:
  another engine on the same model moves them out first (`Int8Engine.bind`). The tokens that all
  rows start with (several samples of one prompt) are cached once, for all rows (`attention_after`).
- Tokens are chosen by gpt2.sampling's rules in NumPy (gpt2.numpy_sampling: a call into
  TensorFlow between two steps is slow), with the same seeds and sample numbers as the
  float32 decoder.
"""
import contextlib
import ctypes
import functools
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import struct
import threading
import warnings
import zipfile
from typing import List, NamedTuple

import numpy as np
import tensorflow as tf

from . import numpy_sampling
from .engine import Engine, Logprobs, Rows, bucket
from .model import LayerCache, attention_weights, gelu, layer_norm, merge_heads, split_heads
from .sampling import MAX_LOGPROBS, Adjustments
from .storage import checked, file_checksum, with_checksum
from .tensorflow_start import MIN_FREE_BYTES, abandoned, c_stderr_silenced, xla_cache_folder
from .weights import read_weights, weight_files, weights_size

# The linear layers of a block: (name, checkpoint name, [n_in, n_out] in units of n_embd).
LAYERS = (("c_attn", "attn/c_attn", (1, 3)), ("attn_proj", "attn/c_proj", (1, 1)),
          ("c_fc", "mlp/c_fc", (1, 4)), ("mlp_proj", "mlp/c_proj", (4, 1)))
PIECE_WEIGHTS = 12 * 1024 ** 2  # weights per program of the output layer at most (see piece_rows)
PROMPT_PIECE = 64  # prompt tokens per run of a block (see Int8Model.run_prompt)
# The block's small float tensors, each set once as an input of its program: name -> checkpoint name.
VECTORS = {"ln_1_g": "ln_1/g", "ln_1_b": "ln_1/b", "c_attn_b": "attn/c_attn/b", "attn_proj_b": "attn/c_proj/b",
           "ln_2_g": "ln_2/g", "ln_2_b": "ln_2/b", "c_fc_b": "mlp/c_fc/b", "mlp_proj_b": "mlp/c_proj/b"}


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


def piece_rows(hparams):
    """Tokens per piece of the output layer: the vocabulary in equal pieces of at most PIECE_WEIGHTS weights.

    Each piece is quantized on its own (with float32 temporaries of a few times its size: 1558M's
    whole output layer at once would raise its first load's peak) and runs as its own
    program. Fewer pieces ran a little faster, and a few pieces about as fast as one (timed in
    docs/performance.md). So 124M has 4 pieces of 12565 tokens, 1558M 7 of 7180; the last piece is
    padded by a row or a few.
    """
    pieces = -(-hparams.n_vocab * hparams.n_embd // PIECE_WEIGHTS)
    return -(-hparams.n_vocab // pieces)


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


class Program:
    """One TensorFlow Lite program, its inputs and outputs by name, its sizes set by `resize`.

    `program` is the program's bytes, or the path of its file: TensorFlow Lite then maps the file,
    and once XNNPACK has copied the weights into its own layout (at the first allocation, here), the
    mapped pages are released (`release_mapped`), so the weights are in memory once, not twice.
    """

    def __init__(self, program, constants):
        # tf.lite.Interpreter warns that it moves to the ai-edge-litert package (the same class there);
        # TensorFlow 2.21's is the one this was measured with (ai-edge-litert 2.3's ran slower).
        source = dict(model_content=program) if isinstance(program, bytes) else dict(model_path=program)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.interpreter = tf.lite.Interpreter(**source, num_threads=len(os.sched_getaffinity(0)))
        self.inputs = {d["name"]: d["index"] for d in self.interpreter.get_input_details()}  # as the TensorSpecs name them
        self.outputs = [d["index"] for d in self.interpreter.get_output_details()]
        self.constants = constants  # name -> array: inputs that stay the same, set again after each resize
        self.shapes = None
        self.resize()
        if "model_path" in source:
            release_mapped(program)

    def resize(self, **shapes):
        if shapes == self.shapes:
            return
        for name, shape in shapes.items():
            self.interpreter.resize_tensor_input(self.inputs[name], shape)
        with c_stderr_silenced():  # TensorFlow Lite's line that it uses XNNPACK
            self.interpreter.allocate_tensors()
        for name, value in self.constants.items():
            self.interpreter.set_tensor(self.inputs[name], value)
        self.shapes = shapes

    def input(self, name):
        """A NumPy view of input `name`, to write in place; drop it before `run`."""
        return self.interpreter.tensor(self.inputs[name])()

    def set(self, **inputs):
        for name, value in inputs.items():
            self.interpreter.set_tensor(self.inputs[name], value)

    def run(self, **inputs):
        self.set(**inputs)
        self.interpreter.invoke()
        return [self.interpreter.get_tensor(i) for i in self.outputs]


def release_freed_memory():
    """Give the memory that the C library keeps after frees back to the system (glibc; elsewhere nothing).

    After quantizing, glibc keeps the memory of the freed checkpoint tensors, and XNNPACK's copies of
    the weights would go on top of it: giving it back lowers the load's peak.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


MADV_DONTNEED = 4  # Linux's madvise advice


def release_mapped(path):
    """Drop this process's pages of the file `path` where it is mapped (Linux; elsewhere nothing).

    They are clean pages of a file: were they touched again, they would be read from the file again.
    """
    path = os.path.realpath(path)
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for line in lines:
        fields = line.rstrip("\n").split(maxsplit=5)  # address range, permissions, offset, device, inode, path
        if len(fields) == 6 and fields[5] == path:
            start, end = (int(address, 16) for address in fields[0].split("-"))
            madvise(start, end - start, MADV_DONTNEED)


TEMPLATES = {"block": (block_template, block_shapes), "head": (head_template, head_shapes)}


@functools.lru_cache(maxsize=None)
def version():
    """A hash of this file: programs and stored models made by another version of it are not read."""
    with open(__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def cached_template(hparams, kind):
    """The Template of `kind` (see TEMPLATES), kept in the compilation cache's folder
    (gpt2.tensorflow_start) for later loads: converting takes seconds, reading it milliseconds."""
    make, shapes = TEMPLATES[kind]
    folder = xla_cache_folder()
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


class Int8Model:
    """GPT-2 with int8 weights: a Program per block and per piece of the output layer, and the embeddings.

    The block programs' cache inputs hold the caches of one Int8Engine at a time, the `bound`
    one, so that a step writes its keys and values in place; `lock` makes the engines on this
    model take turns (see Int8Engine.bind).
    """

    def __init__(self, hparams, blocks, head, wte, wte_scale, wpe):
        self.hparams = hparams
        self.blocks: List[Program] = blocks
        self.head: List[Program] = head  # the logits of tokens 0.., piece_rows.., ...
        self.wte = wte  # [n_vocab, n_embd] int8: the head's weights, which also embed the tokens
        self.wte_scale = wte_scale  # [n_vocab] float32
        self.wpe = wpe  # [n_ctx, n_embd] float32
        self.lock = threading.RLock()
        self.bound = None

    def embed(self, tokens, positions):
        # tokens, positions [batch, seq] -> [batch, seq, n_embd]
        return self.wte[tokens] * self.wte_scale[tokens][..., None] + self.wpe[positions]

    def embed_prompt(self, tokens, first_position):
        """tokens [rows, seq] at positions first_position.. -> their embeddings [rows, seq', n_embd],
        seq' a whole number of run_prompt's pieces (the last one filled up with padding)."""
        piece = min(tokens.shape[1], PROMPT_PIECE)
        tokens = np.pad(tokens, [(0, 0), (0, -tokens.shape[1] % piece)])
        positions = np.minimum(first_position + np.arange(tokens.shape[1]), self.hparams.n_ctx - 1)
        return self.embed(tokens, np.broadcast_to(positions, tokens.shape))

    def run_prompt(self, block, x, shared, n_shared, cache_len):
        """Run embedded tokens x [rows, seq, n_embd] (embed_prompt's) that come after n_shared positions
        cached in `shared` through `block`, PROMPT_PIECE tokens at a time, into a new cache of cache_len
        slots (later tokens are not kept). Returns the block's output [rows, seq, n_embd] and the cache
        (keys [rows, n_head, head_dim, cache_len], values [rows, n_head, cache_len, head_dim]).

        Each program keeps memory for the largest shape it ran: a whole long prompt at once would
        leave every block's program holding memory for it.
        """
        (rows, seq, n_embd), n_head = x.shape, self.hparams.n_head
        piece = min(seq, PROMPT_PIECE)
        cache = LayerCache(np.zeros([rows, n_head, n_embd // n_head, cache_len], np.float32),
                           np.zeros([rows, n_head, cache_len, n_embd // n_head], np.float32))
        self.set_cache(block, cache, shared, n_shared, seq=piece)
        out = []
        for start in range(0, seq, piece):
            y, keys, values = block.run(x=x[:, start:start + piece], pos=np.full(rows, start, np.int32),
                                        keys=cache.keys, values=cache.values)
            end = min(start + piece, cache_len)  # the padding may run past the cache: not kept
            cache.keys[..., start:end] = np.swapaxes(keys, 2, 3)[..., :end - start]
            cache.values[:, :, start:end] = values[:, :, :end - start]
            out.append(y)
        return np.concatenate(out, axis=1), cache

    def set_cache(self, block, own, shared, n_shared, seq=1):
        """Make `block` take seq tokens per row after n_shared positions cached in `shared` for all rows
        and each row's own cache `own` (a resize leaves the inputs unwritten)."""
        rows = len(own.keys)
        block.resize(x=[rows, seq, self.hparams.n_embd], pos=[rows], keys=own.keys.shape, values=own.values.shape,
                     shared_keys=shared.keys.shape, shared_values=shared.values.shape)
        block.set(keys=own.keys, values=own.values, shared_keys=shared.keys, shared_values=shared.values,
                  n_shared=np.int32(n_shared))

    def logits(self, h):
        # hidden states [batch, 1, n_embd] -> logits [batch, n_vocab]
        for piece in self.head:
            piece.resize(h=list(h.shape))
        return np.concatenate([piece.run(h=h)[0][:, 0] for piece in self.head], axis=-1)[:, :self.hparams.n_vocab]


def load_int8(model_dir, hparams):
    """The Int8Model of a model folder.

    The first load reads the checkpoint and quantizes it one tensor at a time (1558M never needs its
    float32 weights in memory), into files in the cache folder (`store`); this load and later ones
    open them from there (`open_stored`): later loads read no checkpoint, and from files each
    program's weights are in memory once (see Program). Where nothing can be stored (the cache is
    off, a nearly full disk), the programs stay in memory as bytes.
    """
    folder = stored_folder(model_dir, hparams)
    if folder and not os.path.isdir(folder):
        store(model_dir, hparams, folder)
        release_freed_memory()
    if folder and os.path.isdir(folder):
        try:
            return open_stored(folder, hparams)
        except (OSError, ValueError, KeyError, EOFError, RuntimeError, zipfile.BadZipFile):
            shutil.rmtree(folder, ignore_errors=True)  # damaged: quantized again below, stored by the next load
    return build_model(hparams, *quantized(model_dir, hparams, keep=lambda name, program: program))


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


ARRAYS = ("wte", "wte_scale", "wpe", "ln_f_g", "ln_f_b")  # what an Int8Model keeps beside its programs
CHECKSUMS = "checksums.json"  # a stored folder's files' sizes and CRC-32s


def build_model(hparams, blocks, head, arrays):
    """The Int8Model of `quantized`'s programs (bytes or files) and arrays."""
    ln_f = {"ln_f_g": arrays["ln_f_g"], "ln_f_b": arrays["ln_f_b"]}
    return Int8Model(hparams, [Program(program, vectors) for program, vectors in blocks],
                     [Program(program, ln_f) for program in head], arrays["wte"], arrays["wte_scale"], arrays["wpe"])


def stored_folder(model_dir, hparams):
    """The cache folder's place for the int8 programs of model_dir's checkpoint as it is now (its
    files' sizes, times and inodes), made by this version of this file; or None: the cache is off,
    or there are no weights (read_weights then says what is missing)."""
    cache = xla_cache_folder()
    try:
        stamp = [(s.st_size, s.st_mtime_ns, s.st_ino) for s in map(os.stat, weight_files(model_dir))]
    except OSError:
        return None
    if cache is None:
        return None
    model = hashlib.sha256(os.path.realpath(model_dir).encode()).hexdigest()[:16]
    weights = hashlib.sha256(repr((stamp, tuple(hparams))).encode()).hexdigest()[:16]  # version() covers the rest
    return os.path.join(cache, "int8-models", f"{version()}-{model}-{weights}")


def store(model_dir, hparams, folder):
    """Quantize the checkpoint into `folder`: a .tflite file per program, the ARRAYS as .npy files, the
    blocks' VECTORS in vectors.npz.

    First the folders that no load will open again are removed: other versions', this model
    folder's older checkpoints', abandoned temporary ones. Nothing is written where the disk would
    keep less than MIN_FREE_BYTES free. `folder` is whole or absent, also after a full disk, Ctrl-C
    or a power cut: it is written under another name, each file synced to the disk, and renamed.
    CHECKSUMS records each file's size and CRC-32, for open_stored to check.
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
        for name in os.listdir(parent):
            path = os.path.join(parent, name)
            with contextlib.suppress(FileNotFoundError):  # another process removed it first
                if abandoned(path) or not name.endswith(".tmp") and (
                        not name.startswith(version()) or name.startswith(version_and_model)):
                    shutil.rmtree(path)
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
        write(CHECKSUMS, lambda f: f.write(json.dumps(checksums).encode()))
        os.rename(temporary, folder)
    except OSError:
        pass  # a full or read-only disk: load_int8 keeps the programs in memory
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def open_stored(folder, hparams):
    """The Int8Model that `store` wrote to `folder`: its programs mapped from their files, its arrays too.

    Each file's size and CRC-32 are checked first: TensorFlow Lite's interpreter crashes the whole
    process on a program cut off, and computes other numbers from one whose bytes changed. A
    ValueError where one differs."""
    with open(os.path.join(folder, CHECKSUMS), encoding="utf-8") as f:
        checksums = json.load(f)
    for name, expected in checksums.items():
        if list(file_checksum(os.path.join(folder, name))) != expected:
            raise ValueError(f"{name} in {folder} is damaged")
    with np.load(os.path.join(folder, "vectors.npz")) as vectors:
        blocks = [(os.path.join(folder, f"block{i}.tflite"), {name: vectors[f"{i}/{name}"] for name in VECTORS})
                  for i in range(hparams.n_layer)]
    head = [os.path.join(folder, f"head{i}.tflite") for i in range(-(-hparams.n_vocab // piece_rows(hparams)))]
    arrays = {name: np.load(os.path.join(folder, name + ".npy"), mmap_mode="r") for name in ARRAYS}
    return build_model(hparams, blocks, head, arrays)


class Int8Engine(Engine):
    """gpt2.engine's interface on an Int8Model: its rows' caches are NumPy arrays while another
    engine of the model is bound to its programs, and its programs' input tensors while it is
    bound itself; tokens are chosen by gpt2.sampling's rules in NumPy (gpt2.numpy_sampling: rarely,
    they differ from the compiled rules' at the last ulp)."""

    fused_steps = False  # each step is a call of each program anyway

    def __init__(self, model, rows, prefix=()):
        super().__init__(model.hparams, rows, prefix)
        self.model = model
        hparams = model.hparams
        n_head, head_dim = hparams.n_head, hparams.n_embd // hparams.n_head
        self.values = Rows.empty(rows, hparams.n_ctx)
        # The rows' own caches while this engine is not bound (None while it is), and the prefix's
        # cache, which every row reads: a LayerCache per block.
        self.own = [LayerCache(np.zeros([rows, n_head, head_dim, bucket(1, hparams.n_ctx)], np.float32),
                               np.zeros([rows, n_head, bucket(1, hparams.n_ctx), head_dim], np.float32))
                    for _ in model.blocks]
        nothing = LayerCache(np.zeros([n_head, head_dim, 1], np.float32), np.zeros([n_head, 1, head_dim], np.float32))
        self.shared = [nothing] * len(model.blocks)
        if self.prefix:
            with model.lock:
                self.unbind_all()  # running the prompt resizes the programs
                x = model.embed_prompt(np.array([self.prefix], np.int32), 0)
                for i, block in enumerate(model.blocks):
                    x, cache = model.run_prompt(block, x, nothing, 0, len(self.prefix))
                    self.shared[i] = LayerCache(cache.keys[0], cache.values[0])

    def unbind_all(self):
        """Move the bound engine's caches (if any) out of the programs, into its own arrays."""
        bound = self.model.bound
        if bound is not None:
            bound.own = [LayerCache(block.input("keys").copy(), block.input("values").copy())
                         for block in self.model.blocks]
            self.model.bound = None

    def bind(self):
        """Put this engine's caches into the programs' inputs, where its steps write in place."""
        if self.model.bound is self:
            return
        self.unbind_all()
        for block, own, shared in zip(self.model.blocks, self.own, self.shared):
            self.model.set_cache(block, own, shared, len(self.prefix))
        self.own, self.model.bound = None, self

    def cache_len(self):
        return (self.model.blocks[0].shapes["keys"] if self.own is None else self.own[0].keys.shape)[3]

    def _admit(self, rows, requests):
        model, n_prefix = self.model, len(self.prefix)
        own_tokens = [list(request.tokens)[n_prefix:] for request in requests]
        self.values = self.values.admitted(rows, n_prefix, requests, self.hparams.n_vocab)
        with model.lock:
            self.unbind_all()
            # Room for the first step's token; steps grow the caches as the text does (a step reads
            # its whole cache: the smaller, the faster).
            live = self.values.left > 0
            cache_len = max(self.cache_len(), bucket(int(self.values.pos[live].max()) + 1, self.hparams.n_ctx - n_prefix))
            self.grow(cache_len)
            rests = [tokens[:-1] for tokens in own_tokens]
            longest = max(len(rest) for rest in rests)
            if longest:
                # Rows with the same rest run it once, and their caches start as copies.
                padded = np.array([rest + [0] * (longest - len(rest)) + [len(rest)] for rest in rests], np.int32)
                unique, row_rest = np.unique(padded, axis=0, return_inverse=True)
                x = model.embed_prompt(unique[:, :-1], n_prefix)
                for block, own, shared in zip(model.blocks, self.own, self.shared):
                    x, cache = model.run_prompt(block, x, shared, n_prefix, cache_len)
                    own.keys[rows], own.values[rows] = cache.keys[row_rest.reshape(-1)], cache.values[row_rest.reshape(-1)]
            self.bind()

    def grow(self, cache_len):
        """Give the rows' own caches cache_len slots (unbound), keeping what they hold."""
        more = cache_len - self.own[0].keys.shape[3]
        if more > 0:
            self.own = [LayerCache(np.pad(own.keys, [(0, 0), (0, 0), (0, 0), (0, more)]),
                                   np.pad(own.values, [(0, 0), (0, 0), (0, more), (0, 0)])) for own in self.own]

    def _step(self, n):
        values, rows = self.values, np.arange(self.rows)
        out = np.full([self.rows, n], -1, np.int32)
        made = Logprobs(np.zeros([self.rows, n], np.float32), np.zeros([self.rows, n, MAX_LOGPROBS], np.int32),
                        np.zeros([self.rows, n, MAX_LOGPROBS], np.float32)) if self.logprobs else None
        with self.model.lock:
            self.bind()
            for i in range(n):
                live = values.left > 0
                if not live.any():
                    n = i
                    break
                next_logits = self.forward(values.token, values.pos, live)
                adjusted = numpy_sampling.adjust(next_logits, *(getattr(values, name) for name in Adjustments._fields))
                token = numpy_sampling.choose(adjusted, values.made, values.row_seeds, values.temperature,
                                              values.top_k, values.top_p, values.min_p)
                token = np.where(live, token, -1).astype(np.int32)
                if made:
                    top_values, top_tokens, logprobs = numpy_sampling.top_logprobs(next_logits, MAX_LOGPROBS)
                    made.chosen[:, i] = logprobs[rows, np.maximum(token, 0)]
                    made.top_tokens[:, i], made.top_logprobs[:, i] = top_tokens, top_values
                stepped = live.astype(np.int32)
                values.left[:] = np.where(token == values.stop_token, 0, values.left - stepped)
                values.token[:] = np.where(live, token, values.token)
                values.history[rows, np.minimum(values.text_len, values.history.shape[1] - 1)] = values.token
                values.text_len[:] += stepped
                values.pos[:] += stepped
                values.made[:] += stepped
                values.temperature[values.left == 0] = 0
                out[:, i] = token
        return out[:, :n], values.left > 0, made and Logprobs(*(array[:, :n] for array in made))

    def forward(self, tokens, pos, live):
        """Feed tokens [rows] into slots pos [rows] of the rows' own caches (bound): the logits
        [rows, n_vocab] that follow them. Rows not live are fed too, into a slot no live query sees."""
        model = self.model
        cache_len = self.cache_len()
        if pos[live].max() >= cache_len:  # a live row reached the end of its slots
            self.unbind_all()
            self.grow(bucket(int(pos[live].max()) + 1, self.hparams.n_ctx - len(self.prefix)))
            self.bind()
            cache_len = self.cache_len()
        slots = np.minimum(pos, cache_len - 1).astype(np.int32)
        x = model.embed(tokens[:, None], np.minimum(slots + len(self.prefix), self.hparams.n_ctx - 1)[:, None])
        rows = np.arange(len(tokens))
        for block in model.blocks:
            x, keys, values = block.run(x=x, pos=slots)  # the new keys and values [rows, n_head, 1, head_dim]
            view = block.input("keys")
            view[rows, :, :, slots] = keys[:, :, 0]
            view = block.input("values")
            view[rows, :, slots] = values[:, :, 0]
            del view
        return model.logits(x)
