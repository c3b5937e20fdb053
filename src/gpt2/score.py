"""Scoring text: the log-probability GPT-2 gives each token, over sliding windows of the context.

The rule, so that results compare with other tools: a text's tokens t_1..t_N are preceded by
<|endoftext|> (as GPT-2 saw documents in training), so every token of the text is scored, t_1
given <|endoftext|> alone. A text longer than the context is scored in windows of n_ctx tokens
over the sequence [<|endoftext|>, t_1, ..., t_N]: window j starts at position j * stride and
covers n_ctx positions (fewer at the end of the text); it scores only the positions that no
earlier window scored. So every token is scored exactly once, with at least n_ctx - stride tokens
before it once the text is long enough. The windows run through the plain forward pass (no
cache), `batch_size` at a time, compiled with XLA for each of a few window sizes.

Text is read and encoded in pieces, cut only where GPT-2's pre-tokenizer would cut too (between a
non-space character and a space or newline), so that a file of any size is scored with the tokens
of the whole text and never held in memory at once.
"""
import math
from typing import NamedTuple

import numpy as np
import regex
import tensorflow as tf

from .decode import bucket
from .model import forward
from .tensorflow_start import compiled

# Characters of text read and encoded at a time: about 250,000 tokens of English.
PIECE_CHARS = 1 << 20
# A place to cut text into pieces that encode as the whole does: no pre-tokenizer match crosses it
# (a match that starts at a non-space character never takes a space or newline after it), and
# matching restarts there as it would at the start of a text (the pattern has no look-behind).
SAFE_CUT = regex.compile(r"(?<=\S)(?=[ \n])")


class Score(NamedTuple):
    """What GPT-2 made of a text: its `tokens` and the natural log-probability of each (`logprobs`)."""
    tokens: np.ndarray  # [N] token ids of the text
    logprobs: np.ndarray  # [N] float64, log p(t_i | <|endoftext|>, t_1, ..., t_{i-1}) within its window
    n_bytes: int  # the text's length in UTF-8 bytes

    @property
    def nll(self):
        """Mean negative log-likelihood, nats per token."""
        return -float(np.mean(self.logprobs))

    @property
    def perplexity(self):
        return math.exp(self.nll)

    @property
    def bits_per_byte(self):
        """Total bits over the text's UTF-8 bytes: comparable across tokenizers."""
        return -float(np.sum(self.logprobs)) / math.log(2) / self.n_bytes


def text_pieces(text_file, piece_chars=PIECE_CHARS):
    """Pieces of the text read from `text_file` (a file open as text), each ending where GPT-2's
    pre-tokenizer would end a match: encoding them one by one gives the whole text's tokens."""
    held = ""
    while True:
        chunk = text_file.read(piece_chars)
        if not chunk:
            break
        held += chunk
        cut = None
        for cut in SAFE_CUT.finditer(held, max(0, len(held) - len(chunk) - 1)):
            pass
        if cut is not None:  # the last safe place in what was read; the rest waits for more text
            yield held[:cut.start()]
            held = held[cut.start():]
    if held:
        yield held


def windows(tokens, n_ctx, stride):
    """The windows over a token sequence (any iterable, read only as far as needed).

    Yields (start, window, n_scored): `window` is the list of tokens at positions start,
    start + 1, ... (n_ctx of them, fewer at the end), and its last n_scored tokens are the ones
    this window scores, each predicted from the tokens before it in the window.
    """
    tokens = iter(tokens)
    held, held_from = [], 0  # held[i] is the token at position held_from + i
    start, scored_until = 0, 1  # position 0 (<|endoftext|>) is context, never scored
    while True:
        for token in tokens:
            held.append(token)
            if held_from + len(held) >= start + n_ctx:
                break
        end = min(held_from + len(held), start + n_ctx)
        if end <= scored_until:  # the text ended where the last window did
            return
        yield start, held[start - held_from:end - held_from], end - scored_until
        if end < start + n_ctx:  # the text ended inside this window
            return
        scored_until = end
        start += stride
        del held[:start - held_from]
        held_from = start


# XLA: a window runs faster than as a plain graph
@compiled(jit_compile=True)
def _window_logprobs(params, tokens, lengths, *, hparams, n_scored, top):
    """log p of the last n_scored tokens of each window: tokens [batch, seq] (row b's first lengths[b]
    are its window, then padding) -> [batch, n_scored] float32 (a row that scores fewer has its
    values at the end); and the `top` largest log-probabilities in each of those places [batch,
    n_scored, top] with their tokens."""
    h = forward(params, hparams, tokens)  # [batch, seq, n_embd]
    target = lengths[:, None] - n_scored + tf.range(n_scored)[None, :]  # [batch, n_scored] positions scored
    target = tf.maximum(target, 1)  # a row scoring fewer: positions it does not score, ignored
    h = tf.gather(h, target - 1, batch_dims=1)  # the hidden state before each scored token
    logits = tf.cast(tf.matmul(h, params["wte"], transpose_b=True), tf.float32)  # [batch, n_scored, n_vocab]
    chosen = tf.gather(logits, tf.gather(tokens, target, batch_dims=1), batch_dims=2)
    logsumexp = tf.reduce_logsumexp(logits, axis=-1)
    top_values, top_tokens = tf.math.top_k(logits, top)
    return chosen - logsumexp, top_values - logsumexp[..., None], top_tokens


class Scored(NamedTuple):
    """Some tokens' scores, in the text's order, as score_tokens yields them."""
    logprobs: np.ndarray  # [k] float64: each token's log-probability
    top_tokens: np.ndarray  # [k, top] int32: the `top` most likely tokens in its place, most likely first
    top_logprobs: np.ndarray  # [k, top] float32: theirs


def score_tokens(params, hparams, tokens, eot_token, *, stride, batch_size=1, top=0):
    """Log-probabilities of a text's tokens (an iterable, read as needed), scored as the module says,
    with the `top` most likely tokens in each place (0: none).

    Yields a Scored for each batch of windows, in the tokens' order, as they are computed.
    """
    def scored(tokens):
        yield eot_token
        yield from tokens

    batch = []
    for start, window, n_scored in windows(scored(tokens), hparams.n_ctx, stride):
        batch.append((window, n_scored))
        if len(batch) == batch_size:
            yield _score_batch(params, hparams, batch, top)
            batch = []
    if batch:
        yield _score_batch(params, hparams, batch, top)


def score_windows(params, hparams, batch, rows):
    """The log-probabilities (float64) of each window's scored tokens, for windows of any texts:
    `batch` is [(window tokens, n_scored)], computed as `rows` rows (short windows fill the rest),
    so that batches of other sizes share the compiled program of `rows`."""
    padding = [([0, 0], 1)] * (rows - len(batch))
    logprobs = _score_batch(params, hparams, batch + padding, top=0).logprobs
    ends = np.cumsum([n_scored for _, n_scored in batch])
    return np.split(logprobs[:ends[-1]], ends[:-1])


def _score_batch(params, hparams, batch, top):
    # Sizes rounded up as the decoder's caches are: few shapes, so few traces.
    seq = bucket(max(len(window) for window, _ in batch), hparams.n_ctx)
    n_scored = bucket(max(n for _, n in batch), seq - 1)
    tokens = np.zeros([len(batch), seq], np.int32)
    for row, (window, _) in zip(tokens, batch):
        row[:len(window)] = window
    out = _window_logprobs(params, tf.constant(tokens), tf.constant([len(w) for w, _ in batch], tf.int32),
                           hparams=hparams, n_scored=n_scored, top=top)
    logprobs, top_logprobs, top_tokens = (values.numpy() for values in out)
    kept = [slice(len(row) - n, None) for row, (_, n) in zip(logprobs, batch)]  # a row's values are at its end
    return Scored(np.concatenate([row[k] for row, k in zip(logprobs, kept)]).astype(np.float64),
                  np.concatenate([row[k] for row, k in zip(top_tokens, kept)]),
                  np.concatenate([row[k] for row, k in zip(top_logprobs, kept)]))
