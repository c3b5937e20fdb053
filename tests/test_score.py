"""Scoring text: the windowing rule, log-probabilities against the NumPy reference, streaming, the script."""
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import gpt2
from gpt2.errors import GPT2Error
from gpt2.score import text_pieces, windows
from gpt2.testing import SAMPLE_TEXT
from test_model import reference_logits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model(tiny_model):
    return gpt2.load("tiny", str(tiny_model.parent))


def test_windows_by_hand():
    """n_ctx 8, stride 3, positions 0..14 (<|endoftext|> and 14 tokens): each position 1..14 scored once."""
    spans = [(start, window, n) for start, window, n in windows(range(15), 8, 3)]
    assert spans == [
        (0, [0, 1, 2, 3, 4, 5, 6, 7], 7),  # scores 1..7
        (3, [3, 4, 5, 6, 7, 8, 9, 10], 3),  # scores 8..10, each with at least 8 - 3 tokens before it
        (6, [6, 7, 8, 9, 10, 11, 12, 13], 3),  # 11..13
        (9, [9, 10, 11, 12, 13, 14], 1),  # 14: the text ends inside this window
    ]
    assert [n for _, _, n in windows(range(14), 8, 3)] == [7, 3, 3]  # ends where a window ends
    assert list(windows(range(5), 8, 3)) == [(0, [0, 1, 2, 3, 4], 4)]  # shorter than the context
    assert list(windows(range(1), 8, 3)) == []  # <|endoftext|> alone: nothing to score


def reference_logprobs(model_dir, tokens, eot, n_ctx, stride):
    """log p of each token, float64, token i (position i + 1 after <|endoftext|>) given the positions
    of the window that the README's rule assigns it: window j = the first whose end passes it."""
    sequence = [eot] + list(tokens)
    out = []
    for position in range(1, len(sequence)):
        j = 0 if position < n_ctx else (position - n_ctx) // stride + 1
        context = sequence[j * stride:position + 1]
        assert len(context) - 1 >= min(position, n_ctx - stride)
        logits = reference_logits(model_dir, context)[-2]
        out.append(logits[sequence[position]] - np.log(np.exp(logits - logits.max()).sum()) - logits.max())
    return np.array(out)


def test_logprobs_of_a_short_text_equal_the_reference(model, tiny_model):
    text = "The river ran past the old mill, and the miller's children ran beside it."
    score = model.score(text)
    assert score.tokens.tolist() == model.encode(text)
    expected = reference_logprobs(tiny_model, score.tokens, model.encoder.eot_token, model.hparams.n_ctx, 64)
    np.testing.assert_allclose(score.logprobs, expected, atol=1e-4)
    assert score.nll == pytest.approx(-expected.mean(), abs=1e-5)
    assert score.perplexity == pytest.approx(math.exp(-expected.mean()), rel=1e-4)


def test_a_text_several_contexts_long_scores_each_token_once_as_the_reference(model, tiny_model):
    tokens = model.encode(SAMPLE_TEXT)[:300]  # 301 positions, n_ctx 128, stride 50: 128, +50 x 3, +23 left over
    assert (300 + 1 - 128) % 50 != 0
    score = model.score(model.decode(tokens), stride=50)
    assert score.tokens.tolist() == tokens and len(score.logprobs) == 300  # every token once
    expected = reference_logprobs(tiny_model, tokens, model.encoder.eot_token, 128, 50)
    np.testing.assert_allclose(score.logprobs, expected, atol=1e-4)


def test_scores_do_not_depend_on_batch_size(model):
    one = model.score(SAMPLE_TEXT, stride=40)
    for batch_size in (3, 8):
        np.testing.assert_allclose(model.score(SAMPLE_TEXT, stride=40, batch_size=batch_size).logprobs,
                                   one.logprobs, atol=1e-5)


def test_bits_per_byte_counts_bytes_not_characters(model):
    text = "Привет, мир. こんにちは世界。 🙂"
    score = model.score(text)
    assert score.n_bytes == len(text.encode("utf-8")) > 2 * len(text)
    assert score.bits_per_byte == pytest.approx(-score.logprobs.sum() / math.log(2) / score.n_bytes)
    assert model.perplexity([text, "the mill"]) == [score.perplexity, model.score("the mill").perplexity]


def test_text_is_read_in_pieces_that_encode_as_the_whole(model):
    """A text 40 times longer than a piece: read a piece at a time, the tokens are the whole text's."""
    text = (SAMPLE_TEXT + "\n\n  spaces   and\ttabs\n") * 30
    read = []

    class Recording(io.StringIO):
        def read(self, n=-1):
            read.append(n)
            return super().read(n)

    pieces = list(text_pieces(Recording(text), piece_chars=1000))
    assert "".join(pieces) == text and len(pieces) > 20
    assert max(read) == 1000 and max(len(p) for p in pieces) < 2000  # never the whole text at once
    assert [t for p in pieces for t in model.encode(p)] == model.encode(text)
    whole = model.score(text, stride=64)
    streamed = list(model.score_pieces(text_pieces(io.StringIO(text), piece_chars=1000), stride=64))
    assert len(streamed) > 1
    np.testing.assert_array_equal(np.concatenate([tokens for tokens, _ in streamed]), whole.tokens)
    np.testing.assert_allclose(np.concatenate([lp for _, lp in streamed]), whole.logprobs, atol=1e-5)


@pytest.mark.parametrize("call,message", [
    (lambda m: m.score(""), "nothing to score: the text is empty"),
    (lambda m: m.score("the mill", stride=128), "stride must be less than the model's context of 128"),
    (lambda m: m.score("the mill", stride=0), "stride must be a whole number of at least 1"),
    (lambda m: m.score(["the mill", 3]), "text must be a string or a non-empty list of strings"),
])
def test_bad_arguments(model, call, message):
    with pytest.raises(GPT2Error, match=message):
        call(model)


def run_score(*args, models_dir, stdin=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "score.py"), *args, "--model_name", "tiny",
                           "--models_dir", str(models_dir)], input=stdin, capture_output=True, text=True, timeout=300)


def test_script_scores_files_and_writes_a_record_per_token(model, tiny_model, tmp_path):
    (tmp_path / "a.txt").write_text(SAMPLE_TEXT, encoding="utf-8")
    (tmp_path / "b.txt").write_text("the mill", encoding="utf-8")
    output = tmp_path / "tokens.jsonl"
    result = run_score(str(tmp_path / "a.txt"), "-", "--stride", "50", "--output", str(output),
                       models_dir=tiny_model.parent, stdin="the mill")
    assert result.returncode == 0, result.stderr
    a, b = model.score(SAMPLE_TEXT, stride=50), model.score("the mill", stride=50)
    lines = result.stdout.splitlines()
    assert lines[0] == (f"{tmp_path / 'a.txt'}: {len(a.tokens)} tokens, {a.nll:.4f} nats/token, "
                        f"perplexity {a.perplexity:.3f}, {a.bits_per_byte:.4f} bits/byte")
    assert lines[1].startswith(f"-: {len(b.tokens)} tokens, {b.nll:.4f} nats/token")
    total_bits = -(a.logprobs.sum() + b.logprobs.sum()) / math.log(2) / (a.n_bytes + b.n_bytes)
    assert lines[2].startswith(f"total: {len(a.tokens) + len(b.tokens)} tokens") and f"{total_bits:.4f} bits/byte" in lines[2]
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert len(records) == len(a.tokens) + len(b.tokens)
    assert [r["index"] for r in records[:len(a.tokens)]] == list(range(len(a.tokens)))
    assert records[0]["file"] == str(tmp_path / "a.txt") and records[-1]["file"] == "-"
    assert [r["token"] for r in records[:len(a.tokens)]] == a.tokens.tolist()
    np.testing.assert_allclose([r["logprob"] for r in records[:len(a.tokens)]], a.logprobs, atol=1e-5)
    assert "".join(r["text"] for r in records[len(a.tokens):]) == "the mill"
    summary = tmp_path / "summary.json"
    assert run_score(str(tmp_path / "b.txt"), "--output", str(summary), models_dir=tiny_model.parent).returncode == 0
    [record] = json.loads(summary.read_text())
    assert record["tokens"] == len(b.tokens) and record["perplexity"] == pytest.approx(b.perplexity, rel=1e-5)


@pytest.mark.parametrize("content,flags,message", [
    (b"", [], "input.txt: nothing to score: the text is empty"),
    (b"caf\xe9 au lait", [], "is not UTF-8 text"),
    (b"the mill", ["--stride", "500"], "--stride must be less than the model's context of 128 tokens"),
    (None, [], "cannot read"),
])
def test_script_bad_input_is_one_line(tiny_model, tmp_path, content, flags, message):
    path = tmp_path / "input.txt"
    if content is not None:
        path.write_bytes(content)
    result = run_score(str(path), *flags, models_dir=tiny_model.parent)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr, result.stderr


def test_output_that_is_also_an_input_is_refused_before_anything_is_written(tiny_model, tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("the mill by the river", encoding="utf-8")
    (texts / "scores.jsonl").write_text('{"kept": true}\n', encoding="utf-8")  # a first run's records
    for output in (texts / "scores.jsonl", tmp_path / "link.jsonl"):
        if output.name == "link.jsonl":
            os.symlink(texts / "scores.jsonl", output)
        result = run_score(*sorted(str(p) for p in texts.iterdir()), "--output", str(output),
                           models_dir=tiny_model.parent)
        assert result.returncode == 1 and result.stderr.strip().count("\n") == 0, result.stderr
        assert f"--output {output} is also a file to score" in result.stderr
        assert (texts / "scores.jsonl").read_text(encoding="utf-8") == '{"kept": true}\n'
    with open(texts / "scores.jsonl", encoding="utf-8") as stdin:  # score.py - --output x < x
        result = subprocess.run([sys.executable, os.path.join(ROOT, "score.py"), "-", "--output",
                                 str(texts / "scores.jsonl"), "--model_name", "tiny", "--models_dir",
                                 str(tiny_model.parent)], stdin=stdin, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "is also a file to score" in result.stderr, result.stderr
    assert (texts / "scores.jsonl").read_text(encoding="utf-8") == '{"kept": true}\n'


def test_standard_input_closed_is_one_line(tiny_model):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "score.py"), "-", "--model_name", "tiny",
                             "--models_dir", str(tiny_model.parent)], stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=120, preexec_fn=lambda: os.close(0))
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == ("error: standard input is closed: pipe the text into the command, or name files "
                                     "to score")
