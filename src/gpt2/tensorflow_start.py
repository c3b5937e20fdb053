"""Importing this module starts TensorFlow as gpt2 wants it: quietly, and keeping compiled XLA
programs on disk from one run to the next.

TensorFlow's C++ start-up lines (CUDA probing on a machine without a GPU, CPU features) are noise
to someone generating text. gpt2.api, gpt2.train and gpt2.finetuning import this first.

Compiling the decoding loop with XLA takes most of a command's first answer. TensorFlow's
persistent compilation cache keeps each compiled program in
a folder and loads it in later runs instead of compiling again; it is on unless GPT2_XLA_CACHE is
"off" (GPT2_XLA_CACHE=<folder> puts it elsewhere). Three things about it shape this module:
- A program compiled for one processor (or GPU) may use instructions another lacks, and one
  TensorFlow version cannot read another's programs: each TensorFlow installation and machine
  gets a folder of its own.
- TensorFlow fails the compiled call, instead of compiling again, when an entry cannot be read or
  written: a cut-off entry is deleted here before TensorFlow starts, and the cache is left off
  where its folder cannot be written or its disk is nearly full.
- TensorFlow first tries to read each entry as text and logs an error line before reading it as
  the binary it is: with the cache on, TensorFlow's C++ errors are not shown (its errors still
  reach Python as exceptions, with their messages).
"""
import contextlib
import glob
import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import time

MIN_FREE_BYTES = 256 << 20  # an entry is a few MB; below this the cache stays off


def machine_key():
    """A short name for this TensorFlow installation on this processor (its instruction set) and GPUs."""
    tensorflow_init = importlib.util.find_spec("tensorflow").origin  # found without importing it
    processor = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            processor += "".join(sorted({line for line in f if line.startswith(("flags", "model name"))}))
    except OSError:
        pass
    for gpu in sorted(glob.glob("/proc/driver/nvidia/gpus/*/information")):  # a GPU's programs are its model's
        with open(gpu) as f:
            processor += "".join(line for line in f if line.startswith("Model"))
    identity = f"{tensorflow_init} {os.stat(tensorflow_init).st_mtime_ns} {processor}"
    return f"{platform.machine()}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def xla_cache_folder():
    """The folder of compiled programs to use, or None: turned off, unwritable or a nearly full disk."""
    setting = os.environ.get("GPT2_XLA_CACHE", "")
    if setting.lower() in ("off", "0", "false", "no"):
        return None
    base = setting or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gpt2", "xla")
    try:
        folder = os.path.join(base, machine_key())  # AttributeError: no TensorFlow, whose import then says so
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK) or shutil.disk_usage(folder).free < MIN_FREE_BYTES:
            return None
        remove_broken_entries(folder)
    except (OSError, AttributeError):
        return None
    return folder


def remove_broken_entries(folder):
    """Delete entries cut off by a crash or a full disk, and abandoned temporary files."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.endswith(".pb") and not is_whole_protobuf(path) or abandoned(path):
            os.remove(path)


def abandoned(path):
    """Whether `path` is a temporary file or folder (named *.tmp) more than an hour old: what a killed
    process left while writing."""
    return path.endswith(".tmp") and os.stat(path).st_mtime < time.time() - 3600


def is_whole_protobuf(path):
    """Whether the file is a sequence of complete protobuf fields, its last one ending at the file's end.

    Reads only the fields' keys and lengths, a few bytes per field.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        while f.tell() < size:
            key = read_varint(f)
            if key is None:
                return False
            wire_type = key & 7
            if wire_type == 0:
                if read_varint(f) is None:
                    return False
            elif wire_type in (1, 5):
                f.seek(8 if wire_type == 1 else 4, os.SEEK_CUR)
            elif wire_type == 2:
                length = read_varint(f)
                if length is None:
                    return False
                f.seek(length, os.SEEK_CUR)
            else:
                return False
        return f.tell() == size


def read_varint(f):
    """A protobuf varint read from f, or None where the file ends inside it."""
    value, shift = 0, 0
    while True:
        byte = f.read(1)
        if not byte:
            return None
        value |= (byte[0] & 0x7F) << shift
        shift += 7
        if byte[0] < 0x80:
            return value


@contextlib.contextmanager
def c_stderr_silenced():
    """C++ code's lines to the standard error are dropped inside this (Python's errors still come as exceptions)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


_folder = xla_cache_folder()
if _folder:
    os.environ["TF_XLA_FLAGS"] = f"{os.environ.get('TF_XLA_FLAGS', '')} --tf_xla_persistent_cache_directory={_folder}"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3" if _folder else "2")


@contextlib.contextmanager
def keras_left_for_later():
    """TensorFlow imports Keras's optimizers as it starts (a noticeable part of its import time),
    for SavedModels of Keras models, which gpt2 never reads; `tf.keras` stays Keras 3 either way,
    imported on its first use.

    TF_USE_LEGACY_KERAS=1 during the import makes TensorFlow look for tf_keras's optimizers instead,
    and skip them where tf_keras is not installed; unset again after it, `tf.keras` is Keras 3.
    A user's own TF_USE_LEGACY_KERAS is left as it is.
    """
    mine = "TF_USE_LEGACY_KERAS" not in os.environ and importlib.util.find_spec("tf_keras") is None
    if mine:
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
    try:
        yield
    finally:
        if mine:
            del os.environ["TF_USE_LEGACY_KERAS"]


with c_stderr_silenced(), keras_left_for_later():
    import tensorflow as tf

    tf.config.list_physical_devices()
