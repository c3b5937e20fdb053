"""The encoder against OpenAI's original BPE algorithm, written out again below as the reference."""
import json
import os
import random
import re
from functools import lru_cache

import pytest
import regex

from gpt2 import encoder as encoder_module
from gpt2.encoder import encoder_read_ahead, get_encoder, read_encoder
from gpt2.errors import GPT2Error


class ReferenceBPE:
    """GPT-2's encoder.py (OpenAI, 2019) restated: pair merges by rank over byte-alphabet symbols."""

    def __init__(self, model_dir):
        with open(model_dir / "encoder.json", encoding="utf-8") as f:
            self.encoder = json.load(f)
        with open(model_dir / "vocab.bpe", encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in f.read().split("\n")[1:-1]]
        self.ranks = {merge: i for i, merge in enumerate(merges)}
        # Printable Latin-1 bytes map to themselves, the other 68 bytes to U+0100.. in byte order.
        keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
        moved = [b for b in range(256) if b not in keep]
        self.byte_char = {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}
        self.pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
        self.bpe = lru_cache(maxsize=None)(self._bpe)

    def _bpe(self, token):
        word = tuple(token)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text):
        ids = []
        for piece in self.pattern.findall(text):
            symbols = "".join(self.byte_char[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self.bpe(symbols))
        return ids


HARD_CASES = [
    "",
    "Hello world",
    "I'm sure you'll see they've said we'd go, and she's right; it's John's.",
    "Uppercase contractions: I'M, YOU'LL, DON'T, 'S",
    "multiple   spaces   between\t\ttabs and trailing spaces   ",
    "\n\n\nthree newlines, then\r\nWindows lines\r\n\r\n",
    "   leading spaces and a space before the end ",
    "emoji: 👍🏽 👨‍👩‍👧 🎉🎉🎉 ❤️",
    "CJK: 日本語のテキストです。中文文本。한국어 텍스트.",
    "combining marks: e\u0301 a\u0308 n\u0303 Z\u0351\u0352\u0353",
    "controls: \x00\x01\x07\x1b[31mred\x1b[0m \x7f \x1c\x1d\x1e\x1f \x0b\x0c \x85",
    "unicode spaces:\u00a0\u2003\u3000\u2028\u2029end",
    "<|endoftext|> in a prompt is text, not a special token<|endoftext|>",
    "numbers 1234567890 3.14159 1,000,000 ١٢٣ ½ ²",
    "Привет, мир! Καλημέρα κόσμε! مرحبا بالعالم! नमस्ते दुनिया! שלום עולם",
    "punctuation!!! ??? ... --- ''' \"\"\" ``` ~~~ @#$%^&*()",
    "'''s''t 're've 'm'll'd",
    "\U0001f600\U0010ffff\ue000 private use and the last code point",
    "a" * 500 + " " + "ab" * 300,
]


@pytest.fixture(scope="module")
def encoders(tiny_model):
    return read_encoder(tiny_model), ReferenceBPE(tiny_model)


@pytest.mark.parametrize("text", HARD_CASES)
def test_hard_cases_match_reference(encoders, text):
    encoder, reference = encoders
    assert encoder.encode(text) == reference.encode(text)
    assert encoder.decode(encoder.encode(text)) == text


def test_learned_words_merge_into_few_tokens(encoders):
    encoder, reference = encoders
    text = "The river ran past the old mill, and the miller's children ran beside it."
    ids = encoder.encode(text)
    assert ids == reference.encode(text)
    assert len(ids) < len(text.encode()) / 2  # the vocabulary really merges, the test is not all bytes


def random_text(rng, n):
    """Text drawn from scripts, symbols, spaces and controls, with ASCII words mixed in."""
    ranges = [(0x20, 0x7e), (0x00, 0x1f), (0xa0, 0x24f), (0x300, 0x36f), (0x370, 0x3ff), (0x400, 0x4ff),
              (0x590, 0x6ff), (0x900, 0x97f), (0x2000, 0x206f), (0x3000, 0x30ff), (0x4e00, 0x4fff),
              (0xac00, 0xad00), (0x1f300, 0x1f64f), (0x1f900, 0x1f9ff)]
    words = ["the", " the", " river", "'s", "'ll", " ", "  ", "\n", "\n\n", " 42", "I'm", " mill"]
    parts = []
    for _ in range(n):
        if rng.random() < 0.5:
            parts.append(rng.choice(words))
        else:
            low, high = rng.choice(ranges)
            parts.append(chr(rng.randint(low, high)))
    return "".join(parts)


def test_random_unicode_matches_reference(encoders):
    encoder, reference = encoders
    rng = random.Random(1234)
    for _ in range(300):
        text = random_text(rng, rng.randint(1, 60))
        assert encoder.encode(text) == reference.encode(text), repr(text)
        assert encoder.decode(encoder.encode(text)) == text


def test_stream_decoder_never_splits_a_character(encoders):
    encoder, _ = encoders
    text = "emoji 👍🏽 and 日本語 and e\u0301 — all whole"
    stream = encoder.stream_decoder()
    pieces = [stream.feed([token]) for token in encoder.encode(text)] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    # Single tokens of a 4-byte emoji are not whole characters: plain decode would show U+FFFD.
    assert any("\ufffd" in encoder.decode([token]) for token in encoder.encode("👍🏽"))


def test_stream_decoder_flushes_a_cut_character_as_replacement(encoders):
    encoder, _ = encoders
    stream = encoder.stream_decoder()
    first_byte_of_emoji = encoder.encode("👍")[0]
    assert stream.feed([first_byte_of_emoji]) == ""
    assert stream.flush() == "\ufffd"


def test_eot_token_is_last_id(encoders):
    encoder, _ = encoders
    assert encoder.eot_token == encoder.n_vocab - 1
    assert encoder.decode([encoder.eot_token]) == "<|endoftext|>"


def test_get_encoder_by_name(tiny_model):
    encoder = get_encoder("tiny", str(tiny_model.parent))
    assert encoder.decode(encoder.encode("the mill")) == "the mill"


def test_an_encoder_read_ahead_is_the_next_read(tiny_model, tmp_path, monkeypatch):
    reads, read_files = [], encoder_module._read_files
    monkeypatch.setattr(encoder_module, "_read_files", lambda model_dir: reads.append(model_dir) or read_files(model_dir))
    with encoder_read_ahead(tiny_model):
        early = read_encoder(str(tiny_model) + os.sep)  # the same folder, written another way
        assert reads == [tiny_model]  # read once, by the thread
        assert early.encode("the mill") == read_files(tiny_model).encode("the mill")
        read_encoder(tiny_model)
        assert reads == [tiny_model] * 2  # taken once: a later read reads the files again
    with encoder_read_ahead(tiny_model):
        pass  # a load that failed before reading it: dropped
    assert encoder_module._read_ahead == {}

    (tmp_path / "vocab.bpe").write_bytes((tiny_model / "vocab.bpe").read_bytes())
    (tmp_path / "encoder.json").write_bytes((tiny_model / "encoder.json").read_bytes()[:100])
    with encoder_read_ahead(tmp_path):
        with pytest.raises(GPT2Error, match="damaged"):  # raised where the read is taken
            read_encoder(tmp_path)
    assert reads.count(tmp_path) == 1  # the thread's read, not one of read_encoder's own


def test_mismatched_vocab_files_are_reported(tiny_model, tmp_path):
    for name in ("encoder.json", "vocab.bpe"):
        (tmp_path / name).write_bytes((tiny_model / name).read_bytes())
    lines = (tmp_path / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    lines[1], lines[2] = lines[2], lines[1]  # two merges out of order: ids no longer follow the ranks
    (tmp_path / "vocab.bpe").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(GPT2Error, match="do not match"):
        read_encoder(tmp_path)


def test_damaged_encoder_json_is_reported(tiny_model, tmp_path):
    (tmp_path / "vocab.bpe").write_bytes((tiny_model / "vocab.bpe").read_bytes())
    (tmp_path / "encoder.json").write_bytes((tiny_model / "encoder.json").read_bytes()[:100])
    with pytest.raises(GPT2Error, match="damaged"):
        read_encoder(tmp_path)


@pytest.mark.parametrize("char", ["\u0007", " ", "\u20ac"])  # a control byte and a space (GPT-2 writes them moved up), €
def test_a_token_outside_gpt2s_byte_alphabet_is_reported(tiny_model, tmp_path, char):
    (tmp_path / "vocab.bpe").write_bytes((tiny_model / "vocab.bpe").read_bytes())
    encoder = json.loads((tiny_model / "encoder.json").read_text(encoding="utf-8"))
    token = next(t for t, i in encoder.items() if i == 300)
    encoder[token + char] = encoder.pop(token)
    (tmp_path / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    with pytest.raises(GPT2Error, match=re.escape(f"vocabulary token {(token + char)!r} is not in GPT-2's byte alphabet")):
        read_encoder(tmp_path)
