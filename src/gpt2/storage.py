"""Writing to disk so that nothing is lost: locks, whole-or-nothing folders, checksummed cache files.

- A lock is flock on a file: it dies with its process, so a killed command never blocks the next.
- `replace_folder` puts a finished folder in the place of an old one with one atomic exchange
  where the system has it (Linux's renameat2 RENAME_EXCHANGE): a kill at any instant leaves the
  old folder or the new one, whole. Elsewhere it takes two renames, and
  gpt2.folders.recover_folder puts back what a kill between them left.
- Cache files (compiled programs) carry a CRC-32 of their bytes, checked before they are used:
  a file cut off or changed on disk is made again instead of crashing the program that reads it.
  CRC-32 finds damage, not tampering; it is the fastest check in Python's standard library.
"""
import contextlib
import ctypes
import errno
import os
import re
import shutil
import struct
import zlib

try:
    import fcntl
except ImportError:  # Windows: no flock; two commands on one folder are not kept apart there
    fcntl = None

from .errors import GPT2Error


# Locks.

def try_lock(path):
    """An open file descriptor of `path` (created if missing) holding an exclusive flock, or None
    where another process holds it. The lock ends with the descriptor (`unlock`) or the process."""
    lock = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    if fcntl is None:
        return lock
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        return None
    try:
        same = os.path.samestat(os.fstat(lock), os.stat(path))
    except FileNotFoundError:
        same = False
    if not same:  # its holder removed the file as it let go: this lock guards nothing, try again
        os.close(lock)
        return try_lock(path)
    return lock


def shared_lock(path):
    """The file `path` opened for reading, holding a shared flock until it is closed; an OSError
    (BlockingIOError) where another process holds an exclusive one (try_lock's)."""
    f = open(path, "rb")
    if fcntl is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise
    return f


def unlock(path, lock):
    """Let go of a lock from try_lock, removing its file first (a waiter that got the removed file's
    lock sees that and tries again)."""
    with contextlib.suppress(OSError):
        os.remove(path)
    os.close(lock)


_held = set()  # the folders whose lock this process holds: only_writer is re-entrant


@contextlib.contextmanager
def only_writer(folder):
    """Hold `.<name>.lock`, beside `folder`, while the block runs: one process writes `folder` at a time.

    The holder's process number is in the file; a second writer is refused with one line, and so
    is a folder whose parent cannot be written (checked now, before any work that would be lost).
    """
    folder = os.path.abspath(folder)
    if folder in _held:
        yield
        return
    parent = os.path.dirname(folder)
    path = os.path.join(parent, f".{os.path.basename(folder)}.lock")
    try:
        os.makedirs(parent, exist_ok=True)
        lock = try_lock(path)
    except OSError as e:
        raise GPT2Error(f"cannot write in {parent} ({e.strerror}): choose a folder you can write") from e
    if lock is None:
        try:
            with open(path, encoding="ascii") as f:
                holder = f" (process {int(f.read())})"
        except (OSError, ValueError):
            holder = ""
        raise GPT2Error(f"another process{holder} is writing {folder}: wait until it ends, or choose another name")
    with contextlib.suppress(OSError):  # for the message above; a full disk leaves it empty
        os.ftruncate(lock, 0)
        os.write(lock, str(os.getpid()).encode())
    _held.add(folder)
    try:
        yield
    finally:
        _held.discard(folder)
        unlock(path, lock)


# Folders replaced whole.

def _renameat2():
    """glibc's renameat2, or None (another C library, another system)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, TypeError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


_RENAMEAT2 = _renameat2()
AT_FDCWD, RENAME_EXCHANGE = -100, 2


def exchange(a, b):
    """Swap the paths a and b in one atomic step; False where the system or file system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), b)


def writing_name(path):
    """Where a new version of the folder `path` is written before it takes its place."""
    return f"{path}.writing-{os.getpid()}"


def replace_folder(new, path):
    """Move the folder `new` (from writing_name) to `path`, replacing the folder there, if any.
    The caller holds path's lock (only_writer)."""
    if not os.path.exists(path):
        os.rename(new, path)
        return
    if exchange(new, path):
        old = new  # the old folder, now under the new one's temporary name
    else:
        old = f"{path}.old-{os.getpid()}"
        remove(old)  # left by a dead process with this number
        os.rename(path, old)
        os.rename(new, path)  # a kill before this leaves both whole: folders.recover_folder puts `new` in place
    remove(old)  # the new folder is in place: what is left of the old one is the next writer's to remove


def remove(path):
    """Remove a file, a folder, or a link (not what it points to); what cannot be removed stays."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def is_alive(pid):
    """Whether process `pid` runs on this machine (on Windows, always taken to: os.kill would signal it)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_dead_files(folder, pattern):
    """Remove the files, links and folders in `folder` whose whole name matches `pattern` (a regular
    expression whose group 1 is a process number) and whose process is dead."""
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            match = re.fullmatch(pattern, name)
            if match and not is_alive(int(match.group(1))):
                remove(os.path.join(folder, name))


# Checksummed cache files.

CHECKSUM = struct.Struct("<QI")  # size and CRC-32 of what comes before it


def with_checksum(data):
    """bytes followed by their size and CRC-32: a file of them can be checked whole (`checked`)."""
    return data + CHECKSUM.pack(len(data), zlib.crc32(data))


def checked(data):
    """The bytes that `with_checksum` was given, or None where `data` is cut off or changed."""
    if len(data) < CHECKSUM.size:
        return None
    body = data[:-CHECKSUM.size]
    return body if CHECKSUM.unpack(data[-CHECKSUM.size:]) == (len(body), zlib.crc32(body)) else None


def file_checksum(path):
    """(size, CRC-32) of a file's bytes, read in pieces."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while piece := f.read(1 << 22):
            crc, size = zlib.crc32(piece, crc), size + len(piece)
    return size, crc
