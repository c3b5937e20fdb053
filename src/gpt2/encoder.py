"""GPT-2's byte-level BPE tokenizer, read from a model's encoder.json and vocab.bpe (or Hugging Face's
vocab.json and merges.txt, the same files under other names, or its tokenizer.json).

Text is split by GPT-2's regular expression into words, each word's UTF-8 bytes are merged by
the ranks in vocab.bpe, and each merged piece is looked up in encoder.json. The merging runs in
tiktoken's Rust engine, which gives the same ids as OpenAI's original Python code many times
faster; this module reads OpenAI's two files, checks that they agree, and keeps the original's
interface (`get_encoder(model_name, models_dir)`, `encode`, `decode`).
"""
import codecs
import contextlib
import concurrent.futures
import itertools
import json
import os
import threading
from functools import lru_cache

import tiktoken

from .arguments import check_stop, check_text, check_tokens
from .folders import HUGGINGFACE_VOCAB_FILES, TOKENIZER_JSON, VOCAB_FILES, find_model_dir, is_file, read_error
from .errors import GPT2Error

# GPT-2's pre-tokenizer: English contractions, runs of letters, of digits, of other symbols (each
# with one leading space), and whitespace (a run before a word leaves its last space to the word).
PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
END_OF_TEXT = "<|endoftext|>"


@lru_cache()
def bytes_to_unicode():
    """GPT-2's map from each byte value to a printable character.

    encoder.json and vocab.bpe store byte strings as text through this map: printable Latin-1
    bytes stand for themselves, the others (controls, space) are moved to characters from U+0100 up.
    The dict's order is the order of the 256 single-byte tokens in encoder.json.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]
    return dict(zip(printable + others, chars))


# Each character of GPT-2's byte alphabet to the character of its byte, and every other character up
# to U+00FF to U+FFFF, which latin-1 refuses (str.translate leaves a character without an entry as it is).
TO_BYTE_CHARS = {**{code: 0xFFFF for code in range(256)}, **{ord(char): byte for byte, char in bytes_to_unicode().items()}}


def to_bytes(strings):
    """The bytes that each vocabulary string stands for (in GPT-2's byte alphabet, see bytes_to_unicode).

    All strings in one translate (one character, one byte), not a Python call per string: reading
    the vocabulary is a part of every command's start-up.
    """
    try:
        joined = "".join(strings).translate(TO_BYTE_CHARS).encode("latin-1")
    except UnicodeEncodeError:
        bad = next(s for s in strings if any(char > "\xff" for char in s.translate(TO_BYTE_CHARS)))
        raise GPT2Error(f"vocabulary token {bad!r} is not in GPT-2's byte alphabet: "
                        "the model's encoder.json or vocab.bpe is damaged, download the model again") from None
    ends = list(itertools.accumulate(map(len, strings)))
    return [joined[start:end] for start, end in zip([0] + ends, ends)]


class Encoder:
    """Encodes text to GPT-2 token ids and decodes ids back to text.

    `encoder` maps each token (as written in encoder.json) to its id; `bpe_merges` is the list of
    merges in vocab.bpe, best first. As in GPT-2, the text `<|endoftext|>` inside a prompt is
    encoded as ordinary text; the end-of-text token itself is `eot_token`.
    """

    def __init__(self, encoder, bpe_merges):
        self.vocabulary, self.bpe_merges = encoder, bpe_merges  # as read, for write_vocabulary
        # A token's rank is the step of BPE that makes it: the 256 bytes first, then each merge.
        ranks = {bytes([byte]): rank for rank, byte in enumerate(bytes_to_unicode())}
        merged = to_bytes([part for merge in bpe_merges for part in merge])
        for left, right in zip(merged[0::2], merged[1::2]):
            ranks.setdefault(left + right, len(ranks))
        if END_OF_TEXT not in encoder:
            raise GPT2Error(f"encoder.json has no {END_OF_TEXT} token: download the model again")
        tokens = [token for token in encoder if token != END_OF_TEXT]
        ids = dict(zip(to_bytes(tokens), (encoder[token] for token in tokens)))
        if ids != ranks:
            # GPT-2's ids are exactly these ranks; tiktoken relies on it.
            raise GPT2Error("the vocabulary's tokens (encoder.json, vocab.json) and merges (vocab.bpe, merges.txt) "
                            "do not match each other: download the model again")
        if encoder[END_OF_TEXT] != len(ranks):
            # GPT-2's <|endoftext|> is the last id; another would leave an id that no token has.
            raise GPT2Error(f"encoder.json gives {END_OF_TEXT} the id {encoder[END_OF_TEXT]!r}, not {len(ranks)}: "
                            "download the model again")
        self.eot_token = encoder[END_OF_TEXT]
        self.n_vocab = len(encoder)
        self._bpe = tiktoken.Encoding("gpt2-bpe", pat_str=PATTERN, mergeable_ranks=ranks,
                                      special_tokens={END_OF_TEXT: self.eot_token})

    def encode(self, text):
        """Token ids of `text` (a str), exactly as GPT-2's own encoder gives them."""
        return self._bpe.encode_ordinary(check_text("text", text))

    def decode_bytes(self, tokens):
        """The bytes that `tokens` stand for; a multi-byte character may be cut at either end."""
        return self._bpe.decode_bytes(check_tokens(tokens, self.n_vocab))

    def decode(self, tokens):
        """The text of `tokens`; bytes that do not form UTF-8 become U+FFFD, as in GPT-2."""
        return self.decode_bytes(tokens).decode("utf-8", errors="replace")

    def stream_decoder(self):
        """A `StreamDecoder` for turning tokens into text as they are generated."""
        return StreamDecoder(self)


class StreamDecoder:
    """Decodes tokens a few at a time without splitting a character across two pieces.

    A GPT-2 token can end in the middle of a multi-byte UTF-8 character (emoji, CJK); the
    unfinished bytes are held back until the tokens that complete them arrive.
    """

    def __init__(self, encoder):
        self._encoder = encoder
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, tokens):
        """The text that `tokens` complete (possibly empty)."""
        return self._utf8.decode(self._encoder.decode_bytes(tokens))

    def flush(self):
        """What is still held back, as U+FFFD if the tokens ended inside a character."""
        return self._utf8.decode(b"", final=True)


class TextStream:
    """The text of one sample as its tokens arrive: ends at `stop_token` or a `stop` string.

    `feed` returns the text that is now certain: whole characters, and none that could still turn
    out to be the start of a stop string.
    """

    def __init__(self, encoder, stop=None, stop_token=None):
        self.stop = check_stop(stop)
        self.stop_token = stop_token
        self._decoder = encoder.stream_decoder()
        self.text = ""
        self._shown = 0
        self.finished = False

    def feed(self, tokens):
        if self.finished:
            return ""
        tokens = [int(t) for t in tokens]
        if self.stop_token in tokens:  # the sampler pads a stopped row with it; never part of the text
            tokens = tokens[:tokens.index(self.stop_token)]
            self.finished = True
        self.text += self._decoder.feed(tokens)
        if self.finished:
            self.text += self._decoder.flush()
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.finished = self.text[:cut], True
        safe = len(self.text) if self.finished else len(self.text) - self._held_back()
        piece, self._shown = self.text[self._shown:safe], max(self._shown, safe)
        return piece

    def _held_back(self):
        """How many final characters could begin a stop string."""
        return max((n for s in self.stop for n in range(1, len(s)) if self.text.endswith(s[:n])), default=0)

    def finish(self, pending_only=False):
        """The whole text (or, with pending_only, what `feed` has not returned yet), once no more tokens come."""
        if not self.finished:
            self.text += self._decoder.flush()
            self.finished = True
        pending, self._shown = self.text[self._shown:], len(self.text)
        return pending if pending_only else self.text


# Model folders (real paths) whose Encoder a thread is reading, to the Future of it: see encoder_read_ahead.
_read_ahead = {}


@contextlib.contextmanager
def encoder_read_ahead(model_dir):
    """Within it, a thread reads the Encoder of a model folder, and the first read_encoder(model_dir)
    takes it; one not taken is dropped at its end.

    The commands read it while TensorFlow imports, which leaves the interpreter free for part of
    its import, so that the import and the read together take less time than one after the
    other (docs/performance.md). A failure is raised by that
    read_encoder, as reading there would have raised it.
    """
    future = concurrent.futures.Future()

    def read():
        try:
            future.set_result(_read_files(model_dir))
        except BaseException as e:  # noqa: B036 (handed to read_encoder, which raises it)
            future.set_exception(e)

    key = os.path.realpath(model_dir)
    _read_ahead[key] = future
    threading.Thread(target=read, daemon=True).start()
    try:
        yield
    finally:
        if _read_ahead.get(key) is future:
            del _read_ahead[key]


def read_encoder(model_dir):
    """The Encoder of a model folder, from its encoder.json and vocab.bpe."""
    future = _read_ahead.pop(os.path.realpath(model_dir), None)
    return _read_files(model_dir) if future is None else future.result()


def _read_files(model_dir):
    """The Encoder of OpenAI's two files, Hugging Face's two files under their names, or tokenizer.json."""
    names = next((names for names in (VOCAB_FILES, HUGGINGFACE_VOCAB_FILES)
                  if all(is_file(model_dir, name) for name in names)), None)
    path = os.path.join(model_dir, TOKENIZER_JSON if names is None else names[1])
    try:
        if names is None:  # tokenizer.json: both in one, newer files giving each merge as a pair
            with open(path, encoding="utf-8") as f:
                bpe = json.load(f)["model"]
            encoder, merges = bpe["vocab"], [m.split(" ") if isinstance(m, str) else m for m in bpe["merges"]]
        else:  # vocab.bpe: a "#version" line, then one merge per line, "left right"
            with open(os.path.join(model_dir, names[0]), encoding="utf-8") as f:
                encoder = json.load(f)
            with open(path, encoding="utf-8") as f:
                merges = [line.split(" ") for line in f.read().split("\n")[1:] if line]
    except OSError as e:
        raise read_error(e.filename, e) from e
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise GPT2Error(f"the vocabulary in {model_dir} is damaged ({e.__class__.__name__}): "
                        "download the model again") from e
    if not isinstance(encoder, dict) or any(len(merge) != 2 for merge in merges):
        raise GPT2Error(f"{path} is damaged: download the model again")
    return Encoder(encoder, [tuple(merge) for merge in merges])


def write_vocabulary(encoder, folder, names=VOCAB_FILES):
    """Write an Encoder's vocabulary into `folder` as OpenAI's encoder.json and vocab.bpe, or under
    other names (HUGGINGFACE_VOCAB_FILES)."""
    with open(os.path.join(folder, names[0]), "w", encoding="utf-8") as f:
        json.dump(encoder.vocabulary, f, ensure_ascii=False)
    with open(os.path.join(folder, names[1]), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in encoder.bpe_merges))


def get_encoder(model_name, models_dir):
    """The Encoder of model `model_name` in `models_dir`, as in OpenAI's original code."""
    return read_encoder(find_model_dir(model_name, models_dir))
