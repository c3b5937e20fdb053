"""Importing this module starts TensorFlow as gpt2 wants it: quietly, and keeping compiled XLA
programs on disk from one run to the next.

TensorFlow's C++ start-up lines (CUDA probing on a machine without a GPU, CPU features) are noise
to someone generating text. What loads a float model (gpt2.api.GPT2.from_folder, gpt2.cli), makes
int8's programs (gpt2.int8_programs), or trains (gpt2.train, gpt2.finetuning) imports this first.

Compiling the decoding loop with XLA takes most of a command's first answer. TensorFlow's
persistent compilation cache keeps each compiled program in
a folder and loads it in later runs instead of compiling again; it is on unless GPT2_XLA_CACHE is
"off" (GPT2_XLA_CACHE=<folder> puts it elsewhere). Three things about it shape this module:
- A program compiled for one processor (or GPU) may use instructions another lacks, and one
  TensorFlow version cannot read another's programs: each TensorFlow installation and machine
  gets a folder of its own.
- TensorFlow fails the compiled call, instead of compiling again, when an entry cannot be read or
  written. So, before TensorFlow starts, an entry cut off, emptied or changed since it was first
  seen (each then gets a `<entry>.crc` of its size and CRC-32) is deleted, and the cache is left
  off where its folder cannot be written or its disk is nearly full. And each compiled function
  is called through `Compiled`: a call that fails on an entry all the same (damaged
  after the check, or a disk that fills while compiling) has the bad entries removed and is
  compiled again; if it fails again, the process goes on with a cache of its own in memory, with
  one warning. TensorFlow's flag names a link (`.pid-<pid>` in the folder) so that this process
  alone can be pointed elsewhere.
- TensorFlow first tries to read each entry as text and logs an error line before reading it as
  the binary it is: with the cache on, TensorFlow's C++ errors are not shown (its errors still
  reach Python as exceptions, with their messages).
The folders themselves, their checks and their size limit are gpt2.cache's.
"""
import atexit
import contextlib
import functools
import importlib.util
import os
import re
import shutil
import sys

from .cache import OWN_CACHES, check_entries, prune, xla_cache_folder
from .errors import c_stderr_silenced


def process_link(folder):
    """The link `folder`/.pid-<pid> to `folder` itself, which TensorFlow's flag names: pointed at
    another folder, it moves this process's cache alone (a live process's link is its own)."""
    link = os.path.join(folder, f".pid-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.remove(link)  # an earlier process's with this number
    os.symlink(".", link)
    return link


class Compiled:
    """tf.function(python_function, autograph=False, **options), called so that the compilation cache
    never stops it.

    A call that fails on the cache (an entry TensorFlow cannot read, or cannot write: a full disk)
    is made again after the bad entries are removed; a second failure points this process's link to
    a folder in memory, with one warning, and calls once more. TensorFlow keeps a failed
    compilation's error for the traced function, so each new try traces it anew (`function`).
    """

    def __init__(self, python_function, **options):
        self.python_function, self.options = python_function, options
        self.function = tf.function(python_function, autograph=False, **options)

    def __call__(self, *args, **kwargs):
        for fix in (remove_bad_entries, use_a_cache_of_its_own, None):
            try:
                return self.function(*args, **kwargs)
            except Exception as error:
                if fix is None or _folder is None or not is_cache_failure(error):
                    raise
                fix(error)
                self.function = tf.function(self.python_function, autograph=False, **self.options)


def compiled(**options):
    """A decorator: Compiled(function, **options)."""
    return functools.partial(Compiled, **options)


def is_cache_failure(error):
    message = str(error)
    return "xla_compile_cache__" in message or "Serialized cache key does not match" in message


def remove_bad_entries(error):
    """Remove the entry (or temporary file) that `error` names, and every entry check_entries finds bad."""
    named = re.search(r"(xla_compile_cache__[^\s;]+)", str(error))
    if named:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(_folder, named.group(1)))
    check_entries(_folder)


def use_a_cache_of_its_own(error):
    """Point this process's link at a new folder in memory (removed at exit), with one warning."""
    global _own_cache
    if _link is None:
        raise error
    if _own_cache is None:
        _own_cache = os.path.join(OWN_CACHES, f"gpt2-xla-{os.getpid()}")
        shutil.rmtree(_own_cache, ignore_errors=True)  # a dead process's with this number
        os.makedirs(_own_cache)
        atexit.register(shutil.rmtree, _own_cache, ignore_errors=True)  # and the next start's check_entries
        print(f"warning: the compiled-program cache {_folder} failed ({str(error).split(' [Op:')[0][-200:]}): "
              "compiling without it in this run", file=sys.stderr, flush=True)
    temporary = f"{_link}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.remove(temporary)
    os.symlink(_own_cache, temporary)
    os.replace(temporary, _link)


_folder = xla_cache_folder()
_link = _own_cache = None
prune()  # what no run reads again, and the least recently used beyond GPT2_CACHE_SIZE
if _folder:
    try:
        check_entries(_folder)
    except OSError:
        _folder = None
if _folder:
    with contextlib.suppress(OSError):  # no links (Windows without the privilege): no cache of its own either
        _link = process_link(_folder)
    os.environ["TF_XLA_FLAGS"] = (f"{os.environ.get('TF_XLA_FLAGS', '')} "
                                  f"--tf_xla_persistent_cache_directory={_link or _folder}")
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
