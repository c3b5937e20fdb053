"""Fetching model folders from OpenAI's storage (or a mirror), safely.

Each file goes to `<file>.part` and is renamed only when it is complete: the file on disk has the
server's size, and its MD5 matches the server's checksum where one is sent (Azure Blob Storage
sends `Content-MD5` for whole files and `x-ms-blob-content-md5` with every answer). A `.part` left
by an interruption is resumed with an HTTP Range request; a server that ignores Range sends the
whole file again. Timeouts, dropped connections, server errors and bad checksums are retried
with growing pauses, a bounded number of times. One download at a time works in a model folder
(a lock file in it): a second one, from another process or thread, waits for the first.
"""
import base64
import contextlib
import errno
import hashlib
import os
import re
import sys
import time

import requests
from tqdm.auto import tqdm  # widgets in notebooks, text bars in terminals

from .folders import (DOWNLOAD_LOCK, LEGACY_NAMES, MODEL_FILES, MODEL_NAMES, UnknownModel, canonical_name,
                      default_models_dir, find_model_dir, is_hub_name, missing_files)
from .errors import GPT2Error
from .storage import try_lock, unlock

OPENAI_URL = "https://openaipublic.blob.core.windows.net/gpt-2"
CHUNK = 1 << 16  # what an interruption loses at most
LOCK_POLL = 0.2  # seconds between two looks at a lock held by another download


def default_base_url():
    """$GPT2_BASE_URL, else OpenAI's storage; files are under <base_url>/models/<name>/."""
    return os.environ.get("GPT2_BASE_URL") or OPENAI_URL


class _Retry(Exception):
    """A failure that another try may not have: a drop, a timeout, a 5xx, a bad size or checksum."""


def check_model_names(model_names):
    """The canonical names of `model_names`; an unknown one is an error before anything is fetched."""
    # An empty name is shown quoted: "unknown model ''" rather than "unknown model :".
    unknown = [str(name) if str(name).strip() else repr(str(name))
               for name in model_names if canonical_name(name) not in MODEL_NAMES]
    if unknown or not model_names:
        valid = ", ".join(MODEL_NAMES + tuple(LEGACY_NAMES))
        raise GPT2Error(f"unknown model {', '.join(unknown)}: choose from {valid}, or a GPT-2 of the Hugging Face "
                        "Hub as org/name" if unknown else f"name a model to download: one of {valid}, or org/name of "
                        "the Hub")
    return [canonical_name(name) for name in model_names]


def download_model(model_name, models_dir=None, base_url=None, *, retries=5, backoff=1.0, timeout=30,
                   progress=True, lock_timeout=600):
    """Fetch the files of `model_name` that are not yet in models_dir/<name>; returns that folder.

    While another download works in that folder, this one waits (and says so) until it ends, or
    until it has made no progress for `lock_timeout` seconds.
    """
    [name] = check_model_names([model_name])
    model_dir = os.path.join(models_dir or default_models_dir(), name)
    base_url = (base_url or default_base_url()).rstrip("/")
    if not _missing_files(model_dir):
        return model_dir
    try:
        os.makedirs(model_dir, exist_ok=True)
    except OSError as e:
        raise GPT2Error(f"cannot create {model_dir} ({e.strerror}): choose another --models_dir") from e
    with _only_download(model_dir, name, lock_timeout):
        todo = _missing_files(model_dir)  # again: a download that held the folder may have fetched them
        if todo:
            _fetch_files(model_dir, name, base_url, todo, retries=retries, backoff=backoff, timeout=timeout,
                         progress=progress)
    return model_dir


def model_folder(model_name, models_dir, download=True, base_url=None, progress=True):
    """The folder of `model_name` (see gpt2.load): in models_dir or at that path, else fetched
    first where it is OpenAI's (into models_dir) or the Hugging Face Hub's (into its cache)."""
    models_dir = models_dir or default_models_dir()
    try:
        return find_model_dir(model_name, models_dir)
    except GPT2Error as not_here:  # missing, or missing files: an interrupted download resumes
        if canonical_name(model_name) in MODEL_NAMES and download:
            print(f"Fetching model {canonical_name(model_name)} into {models_dir} (only this once)", file=sys.stderr)
            download_model(model_name, models_dir, base_url, progress=progress)
            return find_model_dir(model_name, models_dir)
        if not (isinstance(not_here, UnknownModel) and is_hub_name(model_name)):
            raise
        try:
            return download_from_hub(str(model_name), download)
        except GPT2Error as e:
            raise GPT2Error(f"{not_here}; {e}") from e


def _missing_files(model_dir):
    return [f for f in MODEL_FILES if not os.path.isfile(os.path.join(model_dir, f))]


@contextlib.contextmanager
def _only_download(model_dir, name, lock_timeout):
    """Hold model_dir/.download.lock (flock) while the block runs: one download of a folder at a time.

    Two downloads into one folder would each write the other's `.part` files (a resume appends to
    the live one; one renames what the other still writes). The second waits while the first
    makes progress (the folder's files change), and gives up after lock_timeout seconds without
    any. A lock dies with its process, so a killed download never blocks the next one. The file is
    removed, still locked, on release; a waiter that got the lock of a removed file tries again.
    """
    path = os.path.join(model_dir, DOWNLOAD_LOCK)
    said = False
    seen, since = None, time.monotonic()
    while True:
        try:
            lock = try_lock(path)
        except OSError as e:
            raise GPT2Error(f"cannot create {path} ({e.strerror}): check the folder's permissions") from e
        if lock is not None:
            break
        if not said:
            print(f"waiting for another download of {name} into {model_dir} to finish", file=sys.stderr, flush=True)
            said = True
        now, state = time.monotonic(), _folder_state(model_dir)
        if state != seen:
            seen, since = state, now
        elif now - since > lock_timeout:
            raise GPT2Error(f"another download of {name} into {model_dir} has made no progress for "
                            f"{lock_timeout:g} s: stop it, then rerun to finish the download")
        time.sleep(LOCK_POLL)
    try:
        yield
    finally:
        unlock(path, lock)


def _folder_state(model_dir):
    """The names and sizes of a folder's files: they change while a download makes progress."""
    try:
        return sorted((entry.name, entry.stat().st_size) for entry in os.scandir(model_dir))
    except OSError:
        return None


def _fetch_files(model_dir, name, base_url, todo, *, retries, backoff, timeout, progress):
    with requests.Session() as session:
        sizes = {f: _remote_size(session, f"{base_url}/models/{name}/{f}", timeout) for f in todo}
        total = sum(sizes.values()) if all(sizes.values()) else None
        with tqdm(total=total, desc=f"{name}", unit="B", unit_scale=True, unit_divisor=1024,
                  disable=not progress, position=0) as total_bar:
            for f in todo:
                url = f"{base_url}/models/{name}/{f}"
                _fetch(session, url, os.path.join(model_dir, f), total_bar, retries=retries, backoff=backoff,
                       timeout=timeout, progress=progress)


def _remote_size(session, url, timeout):
    """The file's size from a HEAD request, for the total bar; None if the server does not say."""
    try:
        response = session.head(url, timeout=timeout, allow_redirects=True)
        return int(response.headers["Content-Length"]) if response.status_code == 200 else None
    except (requests.RequestException, KeyError, ValueError):
        return None


def _fetch(session, url, path, total_bar, *, retries, backoff, timeout, progress):
    partial = path + ".part"
    done_before = total_bar.n
    for attempt in range(1, retries + 1):
        try:
            _fetch_once(session, url, partial, total_bar, done_before, timeout, progress)
            os.replace(partial, path)
            return
        except _Retry as e:
            if attempt == retries:
                raise GPT2Error(f"could not download {url} after {retries} tries ({e}): check the network "
                                "connection, then rerun the same command to resume") from e
            time.sleep(backoff * 2 ** (attempt - 1))


def _fetch_once(session, url, partial, total_bar, done_before, timeout, progress):
    have = os.path.getsize(partial) if os.path.isfile(partial) else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with session.get(url, headers=headers, stream=True, timeout=timeout) as response:
            if response.status_code == 416:  # the .part is no prefix of this file: start again
                os.remove(partial)
                raise _Retry("the partial file did not fit the server's")
            if response.status_code >= 500 or response.status_code == 429:
                raise _Retry(f"HTTP {response.status_code}")
            if response.status_code == 404:
                raise GPT2Error(f"{url} was not found (HTTP 404): check the model name and the base URL")
            if response.status_code not in (200, 206):
                raise GPT2Error(f"{url} answered HTTP {response.status_code} {response.reason}: "
                                "check the base URL")
            start, size = _content_range(response, have)
            total_bar.n = done_before + start  # bytes of earlier tries of this file are counted once
            total_bar.refresh()
            with open(partial, "ab" if start else "wb") as f, \
                    tqdm(total=size, initial=start, desc=os.path.basename(partial)[:-5], unit="B",
                         unit_scale=True, unit_divisor=1024, disable=not progress, leave=False,
                         position=1) as bar:
                for chunk in response.iter_content(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
                    total_bar.update(len(chunk))
    except requests.RequestException as e:
        raise _Retry(_reason(e)) from e
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise GPT2Error(f"the disk is full while writing {partial}: free some space and rerun the same "
                            "command to resume") from e
        raise GPT2Error(f"cannot write {partial} ({e.strerror}): check the folder's permissions") from e
    # What is checked is the file on disk, not the bytes received: the file is what gets renamed into place.
    got = os.path.getsize(partial)
    if size is not None and got != size:
        raise _Retry(f"got {got} of {size} bytes")
    whole_md5, body_md5 = _md5s_on_disk(partial, start)
    # Content-MD5 is the checksum of this answer's body; x-ms-blob-content-md5, Azure's, of the whole file.
    checks = [(response.headers.get("Content-MD5"), body_md5), (response.headers.get("x-ms-blob-content-md5"),
                                                               whole_md5)]
    for expected, actual in checks:
        if expected and base64.b64encode(actual.digest()).decode() != expected:
            os.remove(partial)
            raise _Retry("the content did not match the server's MD5 checksum")


def _md5s_on_disk(path, start):
    """MD5s of the file at `path` as it is on disk: of all of it, and of its bytes from `start` on."""
    whole_md5, body_md5 = hashlib.md5(), hashlib.md5()
    try:
        with open(path, "rb") as f:
            before = start  # bytes of earlier answers, in the whole file's checksum only
            while before:
                chunk = f.read(min(CHUNK, before))
                if not chunk:
                    break
                whole_md5.update(chunk)
                before -= len(chunk)
            for chunk in iter(lambda: f.read(CHUNK), b""):
                whole_md5.update(chunk)
                body_md5.update(chunk)
    except OSError as e:
        raise GPT2Error(f"cannot read back {path} ({e.strerror}): check the disk, then rerun") from e
    return whole_md5, body_md5


def _content_range(response, have):
    """(offset this answer starts at, whole file size or None); a 200 restarts from 0."""
    if response.status_code == 206:
        match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
        if not match or int(match.group(1)) != have:
            raise _Retry("the server answered a different range than asked")
        return have, None if match.group(2) == "*" else int(match.group(2))
    length = response.headers.get("Content-Length")
    return 0, int(length) if length is not None else None


def _reason(error):
    if isinstance(error, requests.ConnectionError) and "refused" in str(error).lower():
        return "connection refused"
    if isinstance(error, requests.Timeout):
        return "timed out"
    if isinstance(error, requests.ConnectionError):
        return "connection failed or dropped"
    return error.__class__.__name__


# What loading a Hugging Face GPT-2 needs, of the files a Hub repository may hold (weights in other
# frameworks' formats, ONNX exports, a README, ...).
HUB_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors",
             "vocab.json", "merges.txt", "tokenizer.json"]


def download_from_hub(repo_id, download=True):
    """The folder of the Hugging Face Hub's model `repo_id` in huggingface_hub's cache (~/.cache/huggingface,
    or $HF_HOME, $HF_HUB_CACHE), with the files of HUB_FILES it has, fetched where missing.

    huggingface_hub does the fetching: HF_TOKEN for private and gated models, HF_HUB_OFFLINE=1 (or
    download=False) for the cache alone, HF_ENDPOINT for a mirror. A GPT2Error says in one line what
    went wrong: no such model, no access, no connection, not in the cache.
    """
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        folder = huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=not download)
    except GatedRepoError as e:
        raise GPT2Error(f"{repo_id} on the Hugging Face Hub is gated: accept its terms on huggingface.co, then set "
                        "HF_TOKEN to a token of that account") from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise GPT2Error(f"the Hugging Face Hub has no model {repo_id} (if it is private, set HF_TOKEN to a token "
                        "that may read it)") from e
    except LocalEntryNotFoundError as e:
        if not download or constants.HF_HUB_OFFLINE:
            raise GPT2Error(f"{repo_id} is not in the Hugging Face cache, and fetching is off "
                            f"({'HF_HUB_OFFLINE is set' if download else 'download=False'}): fetch it once "
                            "while online") from e
        reason = str(e.__cause__ or e).splitlines()[0]
        raise GPT2Error(f"cannot reach the Hugging Face Hub to fetch {repo_id} ({reason}): check the connection, "
                        "or set HF_ENDPOINT to a mirror") from e
    except HfHubHTTPError as e:
        raise GPT2Error(f"the Hugging Face Hub refused {repo_id} ({str(e).splitlines()[0]})") from e
    except OSError as e:  # a full disk, say
        raise GPT2Error(f"cannot store {repo_id} in the Hugging Face cache ({e.strerror or e}): free some space, "
                        "or set HF_HUB_CACHE to another folder") from e
    missing = missing_files(folder)
    if missing:
        raise GPT2Error(f"{repo_id} on the Hugging Face Hub has no {' and '.join(missing)}: gpt2 reads GPT-2 folders "
                        "with safetensors weights (pytorch_model.bin alone is not enough)")
    return folder
