"""The cache folder: compiled XLA programs (one folder per TensorFlow installation and processor)
and int8's TensorFlow Lite programs (`int8/`), kept from one run to the next, and kept small.

It is ~/.cache/gpt2/xla ($XDG_CACHE_HOME/gpt2/xla), or GPT2_XLA_CACHE=<folder>; GPT2_XLA_CACHE=off
turns it off. Nothing here imports TensorFlow: an int8 model whose programs are stored runs
without it (gpt2.int8), and TensorFlow's start (gpt2.tensorflow_start) reads these folders first.

`prune`, at each TensorFlow start and after int8 stores a model, removes what no load will read
again and then, while the cache is larger than GPT2_CACHE_SIZE (default 4G), what was used least
recently; what a live process has open (an int8 model) stays.
"""
import contextlib
import functools
import glob
import hashlib
import importlib.util
import os
import platform
import re
import shutil
import tempfile
import time

from .errors import GPT2Error
from .storage import file_checksum, remove, remove_dead_files, try_lock

MIN_FREE_BYTES = 256 << 20  # an entry is a few MB; below this the cache stays off
OWN_CACHES = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()  # in memory where there is one
DEFAULT_SIZE = 4 << 30  # what the whole cache may hold (GPT2_CACHE_SIZE)
# Another TensorFlow installation's or processor's folder is removed once unused this long: a
# home folder shared by two machines, or two environments in use, keep theirs.
OTHERS_KEPT_SECONDS = 24 * 3600
INT8 = "int8"  # the folder of int8's programs
# In each int8 model's folder: its files' sizes and CRC-32s, locked shared while a process has the model open.
INT8_CHECKSUMS = "checksums.json"


def cache_base():
    """The cache's folder (perhaps not made yet), or None where GPT2_XLA_CACHE turns it off."""
    setting = os.environ.get("GPT2_XLA_CACHE", "")
    if setting.lower() in ("off", "0", "false", "no"):
        return None
    return setting or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gpt2", "xla")


def usable_folder(*names):
    """cache_base()/names..., made; or None: turned off, unwritable or a nearly full disk."""
    base = cache_base()
    if base is None:
        return None
    try:
        folder = os.path.join(base, *names)
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK) or shutil.disk_usage(folder).free < MIN_FREE_BYTES:
            return None
    except OSError:
        return None
    return folder


@functools.lru_cache(maxsize=None)
def machine_key():
    """A short name for this TensorFlow installation on this processor (its instruction set) and GPUs
    (once per process: xla_cache_folder and prune both ask at TensorFlow's start)."""
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
    """The folder of compiled XLA programs to use, or None: turned off, unwritable or a nearly full disk."""
    try:
        return usable_folder(machine_key())
    except AttributeError:  # no TensorFlow, whose import then says so
        return None


def int8_folder():
    """The folder of int8's programs, or None (see usable_folder). Not per TensorFlow or processor:
    TensorFlow Lite's programs run on any."""
    return usable_folder(INT8)


def check_entries(folder):
    """Delete what TensorFlow would fail on: entries cut off, emptied or changed since they were
    first seen (each gets a .crc file then); and what dead processes left: temporary files, links."""
    names = set(os.listdir(folder))
    for name in names:
        path = os.path.join(folder, name)
        with contextlib.suppress(FileNotFoundError):  # another process removed it first
            if name.endswith(".pb"):
                if not is_sound_entry(path):
                    os.remove(path)
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path + ".crc")
                elif name + ".crc" not in names:
                    write_entry_checksum(path)
            elif name.endswith(".crc") and name[:-4] not in names or abandoned(path):
                os.remove(path)
    remove_dead_files(folder, r"\.pid-(\d+)")
    remove_dead_files(OWN_CACHES, r"gpt2-xla-(\d+)")  # left by processes that ended without Python's exit


def is_sound_entry(path):
    """Whether the entry can be handed to TensorFlow: a whole protobuf, not empty (TensorFlow reads
    an empty file as an entry of another program), with the size and CRC-32 it was first seen with."""
    if os.path.getsize(path) == 0 or not is_whole_protobuf(path):
        return False
    try:
        with open(path + ".crc", encoding="ascii") as f:
            recorded = tuple(int(n) for n in f.read().split())
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    return recorded == file_checksum(path)


def write_entry_checksum(path):
    temporary = f"{path}.crc.{os.getpid()}.tmp"
    with contextlib.suppress(OSError):  # a full disk: checked again next time
        with open(temporary, "w", encoding="ascii") as f:
            f.write("%d %d" % file_checksum(path))
        os.replace(temporary, path + ".crc")


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


def size_limit():
    """GPT2_CACHE_SIZE in bytes: a number, or one with K, M, G or T (powers of 1024); DEFAULT_SIZE if unset."""
    setting = os.environ.get("GPT2_CACHE_SIZE", "").strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", setting, re.IGNORECASE)
    if not match:
        if setting:
            raise GPT2Error(f"GPT2_CACHE_SIZE is {setting!r}: set it to a size such as 4G, 500M or 0 (keep nothing)")
        return DEFAULT_SIZE
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** ("KMGT".index(unit) + 1 if unit else 0))


def last_use(path):
    """When `path` was last read or written, as far as the file system tells (atime is updated at
    most daily under Linux's default relatime; a folder: its newest file)."""
    stats = [os.stat(path)]
    if os.path.isdir(path):
        stats += [os.stat(os.path.join(path, name)) for name in os.listdir(path)]
    return max(max(s.st_atime, s.st_mtime) for s in stats)


def entry_size(entry):
    """An XLA entry's bytes with its .crc's."""
    return os.path.getsize(entry) + (os.path.getsize(entry + ".crc") if os.path.exists(entry + ".crc") else 0)


def size_of(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))
    return os.path.getsize(path)


def prune(current_int8_version=None):
    """Keep the cache to what later loads read, within size_limit().

    Removed: other TensorFlow installations' or processors' folders unused for OTHERS_KEPT_SECONDS,
    int8 models of another version of gpt2.int8 than `current_int8_version` (when given), then the
    least recently used entries and int8 models until the whole cache fits. An int8 model that a
    live process has open is never removed; an XLA entry removed under a running process is
    compiled again by it (gpt2.tensorflow_start.Compiled).
    """
    base, limit = cache_base(), size_limit()
    if base is None or not os.path.isdir(base):
        return
    try:
        current = machine_key()
    except AttributeError:
        current = None
    now = time.time()
    units = []  # (last use, size, path) of what may go: an XLA entry with its .crc, an int8 model folder, a template
    for name in os.listdir(base):
        path = os.path.join(base, name)
        with contextlib.suppress(FileNotFoundError):  # another process removed it first
            if name == INT8:
                units += int8_units(path, current_int8_version)
            elif os.path.isdir(path) and name != current and last_use(path) < now - OTHERS_KEPT_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.isdir(path):
                for legacy in glob.glob(os.path.join(glob.escape(path), "int8-*")):  # int8's before it had INT8
                    remove(legacy)
                units += [(last_use(entry), entry_size(entry), entry)
                          for entry in glob.glob(os.path.join(glob.escape(path), "*.pb"))]
    total = sum(size for _, size, _ in units)
    for _, size, path in sorted(units):
        if total <= limit:
            break
        if removed(path):
            total -= size


def int8_units(folder, current_version):
    """The int8 models and templates in `folder`, after removing other versions' models that no live process has open."""
    units = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.endswith(".tmp"):
            continue  # being written, or abandoned: store removes those
        if os.path.isdir(path) and current_version and not name.startswith(current_version + "-"):
            removed(path)
        else:
            units.append((last_use(path), size_of(path), path))
    return units


def removed(path):
    """Remove an XLA entry (and its .crc), a file, or an int8 model folder unless a live process has it
    open; whether it was removed."""
    if os.path.isdir(path):
        lock_path = os.path.join(path, INT8_CHECKSUMS)
        lock = None
        if os.path.exists(lock_path):
            lock = try_lock(lock_path)
            if lock is None:
                return False  # open in a live process
        shutil.rmtree(path, ignore_errors=True)
        if lock is not None:
            os.close(lock)
        return not os.path.exists(path)
    remove(path)
    if path.endswith(".pb"):
        remove(path + ".crc")
    return True
