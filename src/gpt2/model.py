"""The GPT-2 forward pass, as pure functions over a params tree that mirrors OpenAI's checkpoint.

    params["wte"]  [n_vocab, n_embd]   token embedding, also the output layer (tied)
    params["wpe"]  [n_ctx, n_embd]     position embedding
    params["h"][i] one transformer block: ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj
    params["ln_f"] the final layer norm

Each linear layer is {"w": [n_in, n_out], "b": [n_out]}; each layer norm is {"g": [n], "b": [n]}.

Keys and values of earlier positions ("past") live in a cache of fixed size, one tensor per block
of shape [batch, 2, n_head, cache_len, head_dim], so that each new token costs one step and the
shapes stay the same from step to step (what a compiled decoding loop needs).
"""
import math
from dataclasses import dataclass

import tensorflow as tf


@dataclass(frozen=True)
class HParams:
    n_vocab: int = 50257
    n_ctx: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12


def gelu(x):
    # The tanh approximation, as GPT-2 was trained with.
    return 0.5 * x * (1.0 + tf.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def layer_norm(x, p, eps=1e-5):
    mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
    return (x - mean) * tf.math.rsqrt(variance + eps) * p["g"] + p["b"]


def linear(x, p):
    return tf.matmul(x, p["w"]) + p["b"]  # [..., n_in] -> [..., n_out]


def split_heads(x, n_head):
    batch, seq = tf.shape(x)[0], tf.shape(x)[1]
    x = tf.reshape(x, [batch, seq, n_head, x.shape[-1] // n_head])
    return tf.transpose(x, [0, 2, 1, 3])  # [batch, n_head, seq, head_dim]


def merge_heads(x):
    batch, seq = tf.shape(x)[0], tf.shape(x)[2]
    x = tf.transpose(x, [0, 2, 1, 3])
    return tf.reshape(x, [batch, seq, x.shape[2] * x.shape[3]])  # [batch, seq, n_embd]


def write_cache(cache, new, pos):
    """cache [batch, n_head, cache_len, head_dim] with positions pos.. replaced by new [.., seq, ..]."""
    cache_len, seq = tf.shape(cache)[2], tf.shape(new)[2]
    placed = tf.roll(tf.pad(new, [[0, 0], [0, 0], [0, cache_len - seq], [0, 0]]), shift=pos, axis=2)
    index = tf.range(cache_len)
    written = (index >= pos) & (index < pos + seq)
    return tf.where(written[:, None], placed, cache)


def attention(x, p, past, pos, n_head):
    """Causal self-attention of x [batch, seq, n_embd] at positions pos..pos+seq-1.

    Returns the output and the block's cache with this chunk's keys and values written in.
    """
    q, k, v = tf.split(linear(x, p["c_attn"]), 3, axis=-1)
    q, k, v = (split_heads(t, n_head) for t in (q, k, v))
    k = write_cache(past[:, 0], k, pos)
    v = write_cache(past[:, 1], v, pos)
    present = tf.stack([k, v], axis=1)
    scores = tf.matmul(q, k, transpose_b=True) / math.sqrt(q.shape[-1])  # [batch, n_head, seq, cache_len]
    # Query i (at position pos + i) sees keys at positions <= pos + i; later cache slots are empty.
    query_pos = pos + tf.range(tf.shape(q)[2])
    visible = tf.range(tf.shape(k)[2])[None, :] <= query_pos[:, None]
    scores = tf.where(visible, scores, tf.constant(-1e10, scores.dtype))
    out = merge_heads(tf.matmul(tf.nn.softmax(scores, axis=-1), v))
    return linear(out, p["c_proj"]), present


def mlp(x, p):
    return linear(gelu(linear(x, p["c_fc"])), p["c_proj"])


def block(x, p, past, pos, n_head):
    a, present = attention(layer_norm(x, p["ln_1"]), p["attn"], past, pos, n_head)
    x = x + a
    x = x + mlp(layer_norm(x, p["ln_2"]), p["mlp"])
    return x, present


def empty_cache(hparams, batch_size, cache_len, dtype=tf.float32):
    """The cache ("past") before any token: one zero tensor per block."""
    shape = [batch_size, 2, hparams.n_head, cache_len, hparams.n_embd // hparams.n_head]
    return [tf.zeros(shape, dtype) for _ in range(hparams.n_layer)]


def forward(params, hparams, tokens, past, pos):
    """Run tokens [batch, seq] at positions pos..pos+seq-1 through the transformer.

    Returns the final hidden states [batch, seq, n_embd] (after ln_f) and the updated cache.
    """
    positions = pos + tf.range(tf.shape(tokens)[1])
    x = tf.gather(params["wte"], tokens) + tf.gather(params["wpe"], positions)
    presents = []
    for p, layer_past in zip(params["h"], past):
        x, present = block(x, p, layer_past, pos, hparams.n_head)
        presents.append(present)
    return layer_norm(x, params["ln_f"]), presents


def logits(params, h):
    """Next-token logits [..., n_vocab] from hidden states, through the tied token embedding."""
    return tf.matmul(h, params["wte"], transpose_b=True)
