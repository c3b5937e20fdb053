"""int8 weights on the CPU: GPT-2's decoding step run by TensorFlow Lite's XNNPACK kernels.

Decoding one token reads every weight once, so on a CPU its speed is the memory's bandwidth over
the weights' bytes; in int8 they are a quarter of float32's. XLA on the CPU has no fast int8
product (it converts the whole weight matrix to float32 first: slower than float32 itself), but
TensorFlow Lite's XNNPACK kernels multiply int8 weights directly ("dynamic range" quantization:
int8 weights with a float scale per output column, each input row quantized to int8 on the fly).

The model runs as small TensorFlow Lite programs, one per block and one per piece of the
output layer (see piece_rows):
- gpt2.int8_programs makes them, with TensorFlow: the first load of a model quantizes its
  checkpoint into programs in the cache folder (`int8_programs.store`). Loads run them from there
  (`open_stored`) in the LiteRT runtime (the ai-edge-litert package), without TensorFlow, which
  takes seconds to import: this module imports none.
  Later loads read no checkpoint, and each program's weights are in memory once, in XNNPACK's
  layout (see Program).
- Int8Engine is gpt2.engine's interface on these programs. The rows' keys and values stay in the
  block programs' input tensors between steps; a step adds the new tokens' ones in place
  (`Int8Engine.forward`), so no cache is copied. The programs hold one engine's caches at a time:
  another engine on the same model moves them out first (`Int8Engine.bind`). The tokens that all
  rows start with (several samples of one prompt) are cached once, for all rows (`attention_after`).
- Tokens are chosen by gpt2.sampling's rules in NumPy (gpt2.numpy_sampling: a call into
  TensorFlow between two steps is slow), with the same seeds and sample numbers as the
  float32 decoder.
"""
import ctypes
import functools
import hashlib
import json
import os
import shutil
import threading
import zipfile
from typing import List, NamedTuple

import numpy as np

from . import numpy_sampling
from .cache import INT8_CHECKSUMS, int8_folder, prune
from .engine import MAX_LOGPROBS, Adjustments, Engine, Logprobs, Rows, bucket
from .errors import GPT2Error, c_stderr_silenced
from .folders import weight_files
from .storage import file_checksum, shared_lock

with c_stderr_silenced():  # LiteRT's start-up lines
    from ai_edge_litert.interpreter import Interpreter

PIECE_WEIGHTS = 12 * 1024 ** 2  # weights per program of the output layer at most (see piece_rows)
PROMPT_PIECE = 64  # prompt tokens per run of a block (see Int8Model.run_prompt)
# The block's small float tensors, each set once as an input of its program: name -> checkpoint name.
VECTORS = {"ln_1_g": "ln_1/g", "ln_1_b": "ln_1/b", "c_attn_b": "attn/c_attn/b", "attn_proj_b": "attn/c_proj/b",
           "ln_2_g": "ln_2/g", "ln_2_b": "ln_2/b", "c_fc_b": "mlp/c_fc/b", "mlp_proj_b": "mlp/c_proj/b"}


class BlockCache(NamedTuple):
    """One block's keys and values of earlier positions, as its program reads them: keys transposed
    [rows, n_head, head_dim, cache_len], values [rows, n_head, cache_len, head_dim] (without rows
    for the shared positions)."""
    keys: np.ndarray
    values: np.ndarray


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


class Program:
    """One TensorFlow Lite program, its inputs and outputs by name, its sizes set by `resize`.

    `program` is the program's bytes, or the path of its file: TensorFlow Lite then maps the file,
    and once XNNPACK has copied the weights into its own layout (at the first allocation, here), the
    mapped pages are released (`release_mapped`), so the weights are in memory once, not twice.
    """

    def __init__(self, program, constants):
        # LiteRT's interpreter is tf.lite.Interpreter's class in a package of its own; per step it
        # ran about 4% slower than TensorFlow 2.21's on the same programs (docs/int8.md says what
        # was tried), but it needs no TensorFlow: an answer comes seconds sooner.
        source = dict(model_content=program) if isinstance(program, bytes) else dict(model_path=program)
        self.interpreter = Interpreter(**source, num_threads=len(os.sched_getaffinity(0)))
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


@functools.lru_cache(maxsize=None)
def version():
    """A hash of this file and gpt2.int8_programs: programs and stored models that another version
    of them made are not read."""
    digest = hashlib.sha256()
    for name in ("int8.py", "int8_programs.py"):
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


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
        self.in_use = None  # a stored model's open checksums file, locked shared (see open_stored)

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
        cache = BlockCache(np.zeros([rows, n_head, n_embd // n_head, cache_len], np.float32),
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
    float32 weights in memory), into files in the cache folder (gpt2.int8_programs.store, which
    imports TensorFlow); this load and later ones open them from there (`open_stored`): later loads
    read no checkpoint and need no TensorFlow, and from files each program's weights are in memory
    once (see Program). Where nothing can be stored (the cache is off, a nearly full disk), the
    programs stay in memory as bytes.
    """
    folder = stored_folder(model_dir, hparams)
    stored_now = folder and not os.path.isdir(folder)
    if stored_now:
        programs_maker().store(model_dir, hparams, folder)
        release_freed_memory()
    if folder and os.path.isdir(folder):
        try:
            model = open_stored(folder, hparams)
        except (OSError, ValueError, KeyError, EOFError, RuntimeError, zipfile.BadZipFile):
            shutil.rmtree(folder, ignore_errors=True)  # damaged: quantized again below, stored by the next load
        else:
            if stored_now:
                prune(version())  # within the cache's size, now that this model is open (and stays)
            return model
    return build_model(hparams, *programs_maker().quantized(model_dir, hparams, keep=lambda name, program: program))


def programs_maker():
    """gpt2.int8_programs, which makes the programs with TensorFlow; a GPT2Error where TensorFlow
    cannot be imported (only a model's first load needs it)."""
    try:
        from . import int8_programs
    except ImportError as error:
        raise GPT2Error(f"int8 makes a model's programs with TensorFlow at its first load, and TensorFlow cannot "
                        f"be imported here ({error}): install it (pip install tensorflow)") from None
    return int8_programs


ARRAYS = ("wte", "wte_scale", "wpe", "ln_f_g", "ln_f_b")  # what an Int8Model keeps beside its programs


def build_model(hparams, blocks, head, arrays):
    """The Int8Model of `quantized`'s programs (bytes or files) and arrays."""
    ln_f = {"ln_f_g": arrays["ln_f_g"], "ln_f_b": arrays["ln_f_b"]}
    return Int8Model(hparams, [Program(program, vectors) for program, vectors in blocks],
                     [Program(program, ln_f) for program in head], arrays["wte"], arrays["wte_scale"], arrays["wpe"])


def stored_folder(model_dir, hparams):
    """The cache's place for the int8 programs of model_dir's checkpoint as it is now (its files'
    sizes, times and inodes), made by this version of gpt2.int8 (`version`); or None: the cache is
    off, or there are no weights (read_weights then says what is missing)."""
    cache = int8_folder()
    try:
        stamp = [(s.st_size, s.st_mtime_ns, s.st_ino) for s in map(os.stat, weight_files(model_dir))]
    except OSError:
        return None
    if cache is None:
        return None
    model = hashlib.sha256(os.path.realpath(model_dir).encode()).hexdigest()[:16]
    weights = hashlib.sha256(repr((stamp, tuple(hparams))).encode()).hexdigest()[:16]  # version() covers the rest
    return os.path.join(cache, f"{version()}-{model}-{weights}")


def open_stored(folder, hparams):
    """The Int8Model that gpt2.int8_programs.store wrote to `folder`: its programs mapped from their
    files, its arrays too.

    While the model is open, it holds a shared lock on the folder's INT8_CHECKSUMS, so that no
    process's gpt2.cache.prune removes the folder; opening marks it as just used. Each file's size
    and CRC-32 are checked first: TensorFlow Lite's interpreter crashes the whole process on a
    program cut off, and computes other numbers from one whose bytes changed. A ValueError where
    one differs, an OSError where the folder is being removed."""
    in_use = shared_lock(os.path.join(folder, INT8_CHECKSUMS))
    os.utime(folder)
    checksums = json.load(in_use)
    for name, expected in checksums.items():
        if list(file_checksum(os.path.join(folder, name))) != expected:
            raise ValueError(f"{name} in {folder} is damaged")
    with np.load(os.path.join(folder, "vectors.npz")) as vectors:
        blocks = [(os.path.join(folder, f"block{i}.tflite"), {name: vectors[f"{i}/{name}"] for name in VECTORS})
                  for i in range(hparams.n_layer)]
    head = [os.path.join(folder, f"head{i}.tflite") for i in range(-(-hparams.n_vocab // piece_rows(hparams)))]
    arrays = {name: np.load(os.path.join(folder, name + ".npy"), mmap_mode="r") for name in ARRAYS}
    model = build_model(hparams, blocks, head, arrays)
    model.in_use = in_use
    return model


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
        # cache, which every row reads: a BlockCache per block.
        self.own = [BlockCache(np.zeros([rows, n_head, head_dim, bucket(1, hparams.n_ctx)], np.float32),
                               np.zeros([rows, n_head, bucket(1, hparams.n_ctx), head_dim], np.float32))
                    for _ in model.blocks]
        nothing = BlockCache(np.zeros([n_head, head_dim, 1], np.float32), np.zeros([n_head, 1, head_dim], np.float32))
        self.shared = [nothing] * len(model.blocks)
        if self.prefix:
            with model.lock:
                self.unbind_all()  # running the prompt resizes the programs
                x = model.embed_prompt(np.array([self.prefix], np.int32), 0)
                for i, block in enumerate(model.blocks):
                    x, cache = model.run_prompt(block, x, nothing, 0, len(self.prefix))
                    self.shared[i] = BlockCache(cache.keys[0], cache.values[0])

    def unbind_all(self):
        """Move the bound engine's caches (if any) out of the programs, into its own arrays."""
        bound = self.model.bound
        if bound is not None:
            bound.own = [BlockCache(block.input("keys").copy(), block.input("values").copy())
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
            self.own = [BlockCache(np.pad(own.keys, [(0, 0), (0, 0), (0, 0), (0, more)]),
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
