"""Model folders made here, for tests, the notebook and benchmarks: no download needed.

`make_model_folder` writes a complete folder in OpenAI's exact layout and variable names (or in
Hugging Face's), with random weights of any shape (tiny for tests, the real 124M..1558M shapes for
benchmarks) and a small BPE vocabulary that `learn_bpe` learns from text, written as encoder.json
and vocab.bpe (vocab.json and merges.txt).
"""
import base64
import hashlib
import json
import os
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import regex

from .checkpoint import variable_shapes, write_checkpoint
from .encoder import END_OF_TEXT, PATTERN, Encoder, bytes_to_unicode, write_vocabulary
from .folders import HUGGINGFACE_VOCAB_FILES, OPENAI_HPARAMS, VOCAB_FILES, HParams
from .huggingface import MAX_SHARD_BYTES, write_config, write_safetensors

# Text to learn a vocabulary from: English prose with contractions, numbers and punctuation,
# plus a little of other scripts so that their words are not all single bytes.
SAMPLE_TEXT = """\
The river ran past the old mill, and the miller's children ran beside it. They didn't stop until
the water turned and the road went up into the hills. "We'll come back tomorrow," said the eldest,
but they've said that before, and I'm not sure they meant it. It's a long way from the mill to the
town: 12 miles by the road, 9 by the river, and 3.5 hours on foot if the weather is kind.

In the town there was a market on Saturdays. People sold bread, cheese, apples and pears, wool and
linen, tools and nails, books and paper. The bookseller kept a list of every book he had ever sold;
the list was 1,024 pages long in 2019 and it is longer now. He'd tell anyone who asked that the
best book was the next one, and the worst was the one you never read.

When the evening came, the lamps were lit one by one along the street. The children counted them:
one, two, three, four, five, six, seven, eight, nine, ten. Then they went home, where the fire was
warm and the soup was hot, and they told their mother everything they had seen that day.

    def greet(name):
        return "Hello, " + name + "!"

Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14159 42% $19.99 #1 @home
Other scripts: Привет, мир. Καλημέρα κόσμε. こんにちは世界。 你好，世界。 مرحبا بالعالم. नमस्ते दुनिया.
Emoji: 🙂 👍 🎉 ❤️ and the end of a line.
"""


def learn_bpe(text, n_merges):
    """The first `n_merges` byte-pair merges of `text`, learned as GPT-2's vocabulary was.

    Words are split by GPT-2's pattern and written in its byte alphabet; the most frequent
    adjacent pair is merged, again and again (ties broken by the pair itself, so the result is
    the same every time). Stops early when no pair is left. Returns the merges, best first.
    """
    alphabet = bytes_to_unicode()
    words = Counter(tuple(alphabet[b] for b in word.encode("utf-8")) for word in regex.findall(PATTERN, text))
    tokens = set(alphabet.values())
    merges = []
    while len(merges) < n_merges:
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        # A pair whose joined string is already a token would make a second route to it: skip it.
        candidates = [(count, pair) for pair, count in pairs.items() if pair[0] + pair[1] not in tokens]
        if not candidates:
            break
        _, (left, right) = max(candidates)
        merges.append((left, right))
        tokens.add(left + right)
        words = Counter({_merge_pair(word, left, right): count for word, count in words.items()})
    return merges


def _merge_pair(word, left, right):
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == left and word[i + 1] == right:
            merged.append(left + right)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


def make_vocab(n_vocab=None, text=SAMPLE_TEXT, n_merges=400):
    """encoder.json's dict and vocab.bpe's merges for a vocabulary learned from `text`.

    Without n_vocab: `n_merges` learned merges. With n_vocab (for the real models' 50257): the
    learned merges, then as many joins of learned tokens as it takes to reach n_vocab tokens.
    The ids are GPT-2's order: the 256 bytes, the merges in order, then <|endoftext|>.
    """
    merges = learn_bpe(text, n_merges if n_vocab is None else n_vocab - 257)
    if n_vocab is not None:
        learned = [a + b for a, b in merges]
        known = set(bytes_to_unicode().values()) | set(learned)
        for a in learned:
            for b in learned:
                if len(merges) < n_vocab - 257 and a + b not in known:
                    merges.append((a, b))
                    known.add(a + b)
    tokens = list(bytes_to_unicode().values()) + [a + b for a, b in merges] + [END_OF_TEXT]
    return {token: i for i, token in enumerate(tokens)}, merges


def random_variables(hparams, seed=0):
    """Random weights for every variable of a checkpoint, scaled to keep activations near 1."""
    rng = np.random.default_rng(seed)
    variables = {}
    for name, shape in variable_shapes(hparams).items():
        if name.endswith("/g"):  # layer norm gains around 1, so that a swapped g and b shows
            value = 1 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        elif name.endswith("/b"):
            value = 0.1 * rng.standard_normal(shape, dtype=np.float32)
        elif name in ("model/wte", "model/wpe"):  # logits through wte come out with a spread of about 2
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(2 / np.sqrt(hparams.n_embd))
        else:
            value = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[-2]))
        variables[name] = value
    return variables


def make_model_folder(model_dir, hparams=None, *, seed=0, text=SAMPLE_TEXT, layout="openai", dtype="float32",
                      max_shard_bytes=MAX_SHARD_BYTES, **shape):
    """Write a complete GPT-2 model folder with random weights; returns its HParams.

    `hparams` is an HParams, the name of one of OpenAI's models ("124M": its real shapes and
    vocabulary size), or None for a tiny model: n_ctx=128, n_embd=32, n_head=4, n_layer=2 and a
    vocabulary learned from `text`, each changeable by keyword (`n_layer=3`).
    layout "openai" writes OpenAI's files; "huggingface" the same model as transformers saves it
    (gpt2.huggingface), its weights stored as `dtype`, in shards of at most max_shard_bytes.
    """
    if isinstance(hparams, str):
        hparams = OPENAI_HPARAMS[hparams]
    if hparams is None:
        encoder, merges = make_vocab(shape.pop("n_vocab", None), text)
        hparams = HParams(**{"n_ctx": 128, "n_embd": 32, "n_head": 4, "n_layer": 2, **shape, "n_vocab": len(encoder)})
    else:
        encoder, merges = make_vocab(hparams.n_vocab, text)
    vocabulary = Encoder(encoder, merges)
    if layout == "openai":
        write_checkpoint(model_dir, hparams, random_variables(hparams, seed))
        write_vocabulary(vocabulary, model_dir, VOCAB_FILES)
    else:
        os.makedirs(model_dir, exist_ok=True)
        write_safetensors(model_dir, random_variables(hparams, seed), dtype, max_shard_bytes)
        write_config(model_dir, hparams, vocabulary.eot_token, dtype)
        write_vocabulary(vocabulary, model_dir, HUGGINGFACE_VOCAB_FILES)
    return hparams


class LocalServer:
    """An HTTP server on 127.0.0.1 in a thread of its own while the `with` block runs, its handler
    class answering; the handler finds this object as self.server.owner."""

    def __init__(self, handler, host="127.0.0.1", port=0):
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._server.owner = self
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()


class ModelMirror(LocalServer):
    """A local HTTP server that serves model folders as OpenAI's storage does, and can misbehave.

        with ModelMirror(models_dir) as mirror:   # serves models_dir/<name>/<file>
            download_model("124M", dest, base_url=mirror.url)

    Files are at <url>/models/<name>/<file>, with Content-Length, Accept-Ranges, Range requests
    (206 with Content-Range), HEAD, `Content-MD5` on whole-file answers and Azure's
    `x-ms-blob-content-md5` on every answer. `fail(file, *faults)` makes the next requests for
    that file misbehave, one fault per request:
        "drop"          send half of the body, then close the connection
        "500", "404"    answer with that status
        "bad_md5"       send the file with a wrong checksum
        "ignore_range"  answer a Range request with the whole file (200)
        "stall"         send half of the body, then nothing for `stall_seconds`
    `rate` (bytes per second) sends every body that slowly, so that downloads take a while.
    `requests` lists what was asked: (method, file name, first byte asked, status, bytes of body it sends),
    logged before the answer goes out, so a client that has its answer finds its request here.
    """

    def __init__(self, root, host="127.0.0.1", port=0, stall_seconds=5.0, rate=None):
        self.root = str(root)
        self.stall_seconds = stall_seconds
        self.rate = rate
        self.requests = []
        self._faults = {}
        self._lock = threading.Lock()
        super().__init__(_MirrorHandler, host, port)

    def fail(self, file_name, *faults):
        with self._lock:
            self._faults.setdefault(file_name, []).extend(faults)

    def _next_fault(self, file_name):
        with self._lock:
            queue = self._faults.get(file_name)
            return queue.pop(0) if queue else None


def _md5_base64(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode()


class _MirrorHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    def do_HEAD(self):
        self.serve(send_body=False)

    def do_GET(self):
        self.serve(send_body=True)

    def serve(self, send_body):
        mirror = self.server.owner
        parts = self.path.lstrip("/").split("/")
        path = os.path.join(mirror.root, *parts[1:]) if len(parts) == 3 and parts[0] == "models" else None
        fault = mirror._next_fault(parts[-1]) if send_body else None
        if path is None or not os.path.isfile(path) or fault in ("404", "500"):
            status = int(fault) if fault else 404
            # Logged before answering, here and below: a client that has its answer finds the request in the log.
            mirror.requests.append((self.command, parts[-1], 0, status, 0))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = os.path.getsize(path)
        md5 = _md5_base64(path)
        match = regex.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
        asked = int(match.group(1)) if match else 0
        start, status = (asked, 206) if match and fault != "ignore_range" else (0, 200)
        if start >= size > 0:
            mirror.requests.append((self.command, parts[-1], asked, 416, 0))
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b""
        if send_body:
            with open(path, "rb") as f:
                f.seek(start)
                body = f.read()
            if fault in ("drop", "stall"):
                body = body[:len(body) // 2]
        mirror.requests.append((self.command, parts[-1], asked, status, len(body)))
        self.send_response(status)
        self.send_header("Content-Length", str(size - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("x-ms-blob-content-md5", "AAAAAAAAAAAAAAAAAAAAAA==" if fault == "bad_md5" else md5)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        else:
            self.send_header("Content-MD5", "AAAAAAAAAAAAAAAAAAAAAA==" if fault == "bad_md5" else md5)
        self.end_headers()
        if send_body:
            try:
                piece = max(1, int(mirror.rate) // 20) if mirror.rate else len(body)  # a 20th of a second's worth
                for offset in range(0, len(body), piece or 1):
                    self.wfile.write(body[offset:offset + piece])
                    self.wfile.flush()
                    if mirror.rate:
                        time.sleep(piece / mirror.rate)
                if fault == "stall":
                    time.sleep(mirror.stall_seconds)
            except (BrokenPipeError, ConnectionResetError):
                pass
            if fault in ("drop", "stall"):
                self.close_connection = True


class FakeHub(LocalServer):
    """A local HTTP server that answers as the Hugging Face Hub does for one model repository, `repo`,
    whose files are those of the folder `root`; any other repository is not found.

        with FakeHub(folder, "org/name") as hub:   # then HF_ENDPOINT=hub.url for huggingface_hub
            ...

    It answers what huggingface_hub's snapshot_download asks: the repository's commit
    (/api/models/<repo>/revision/<rev>), its files (/api/models/<repo>/tree/<commit>), and each
    file (/<repo>/resolve/<commit>/<file>, with the X-Repo-Commit and ETag headers). `requests`
    lists the files that were sent.
    """

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, root, repo, host="127.0.0.1"):
        self.root, self.repo, self.requests = str(root), repo, []
        super().__init__(_HubHandler, host)

    def files(self):
        return {name: open(os.path.join(self.root, name), "rb").read() for name in sorted(os.listdir(self.root))}


class _HubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        hub = self.server.owner
        path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
        files = hub.files()
        if path.startswith(f"/api/models/{hub.repo}/revision/"):
            return self.answer(200, {"id": hub.repo, "sha": hub.COMMIT, "siblings": [{"rfilename": f} for f in files]})
        if path.startswith(f"/api/models/{hub.repo}/tree/"):
            return self.answer(200, [{"type": "file", "path": name, "size": len(data),
                                      "oid": hashlib.sha1(data).hexdigest()} for name, data in files.items()])
        prefix = f"/{hub.repo}/resolve/{hub.COMMIT}/"
        if path.startswith(prefix) and path[len(prefix):] in files:
            data = files[path[len(prefix):]]
            if self.command == "GET":
                hub.requests.append(path[len(prefix):])
            return self.answer(200, data, {"X-Repo-Commit": hub.COMMIT, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'})
        # The Hub's answer for a repository that does not exist, or that the token may not see
        self.answer(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})

    do_HEAD = do_GET

    def answer(self, status, body, headers=None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(data)


def sample(engine, contexts, length, **flags):
    """The continuations of the token lists `contexts` on a gpt2.engine engine, each cut before its
    stop token: row i is sample flags["sample"] + i (default 0 + i) of its seed."""
    from .engine import Request, Settings, decode_requests

    first = flags.pop("sample", 0)
    settings = Settings(**flags)
    requests = [Request(list(context), length, settings._replace(sample=first + i)) for i, context in enumerate(contexts)]
    rows = [[] for _ in requests]
    for made in decode_requests(engine, requests):
        rows[made.index] += made.tokens.tolist()
    return [row[:row.index(settings.stop_token)] if settings.stop_token in row else row for row in rows]
