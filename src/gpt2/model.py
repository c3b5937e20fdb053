"""The GPT-2 forward pass, as pure functions over a params tree that mirrors OpenAI's checkpoint.

    params["wte"]  [n_vocab, n_embd]   token embedding, also the output layer (tied)
    params["wpe"]  [n_ctx, n_embd]     position embedding
    params["h"][i] one transformer block: ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj
    params["ln_f"] the final layer norm

Each linear layer is {"w": [n_in + 1, n_out]}: the checkpoint's w [n_in, n_out] with its bias b
appended as the last row (see `linear`). Each layer norm is {"g": [n], "b": [n]}.
The weights may be float32 (as stored), float16 or bfloat16: the computation runs in their dtype,
except layer norm statistics, attention softmax and the logits, which stay in float32.

Keys and values of earlier positions ("past") live in a cache of fixed size, a pair of tensors
[batch, n_head, cache_len, head_dim] per block, so that each new token costs one step and the
shapes stay the same from step to step (what a compiled decoding loop needs). Each row of a batch
has its own position, so prompts of different lengths can share a batch.

Rows that start with the same tokens (several samples of one prompt) may keep those tokens' keys
and values once, in a cache without a batch dimension ("shared", [n_head, shared_len, head_dim]
per block, holding positions 0..n_shared-1); each row's own cache then starts at position n_shared.
Decoding reads every cached key and value at every step, so this reads the prompt once per step
instead of once per row.
"""
import math
from typing import NamedTuple

import tensorflow as tf


class HParams(NamedTuple):  # a NamedTuple: tf.function keys its compiled code on these values
    n_vocab: int = 50257
    n_ctx: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12


def gelu(x):
    # The tanh approximation, as GPT-2 was trained with.
    return 0.5 * x * (1.0 + tf.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def layer_norm(x, p, eps=1e-5):
    x32 = tf.cast(x, tf.float32)  # float16 would overflow in the variance
    mean, variance = tf.nn.moments(x32, axes=[-1], keepdims=True)
    return tf.cast((x32 - mean) * tf.math.rsqrt(variance + eps), x.dtype) * p["g"] + p["b"]


def linear(x, p):
    """x [..., n_in] @ w + b [..., n_out], as one product of [x, 1] and p["w"], whose last row is b.

    A bias added after the product is fused into it by XLA on a CPU, which then runs a slower
    matrix-vector kernel: one row per step decodes about 10% faster this way.
    """
    return tf.matmul(tf.concat([x, tf.ones_like(x[..., :1])], axis=-1), p["w"])


def split_heads(x, n_head):
    batch, seq = tf.shape(x)[0], tf.shape(x)[1]
    x = tf.reshape(x, [batch, seq, n_head, x.shape[-1] // n_head])
    return tf.transpose(x, [0, 2, 1, 3])  # [batch, n_head, seq, head_dim]


def merge_heads(x):
    batch, seq = tf.shape(x)[0], tf.shape(x)[2]
    x = tf.transpose(x, [0, 2, 1, 3])
    return tf.reshape(x, [batch, seq, x.shape[2] * x.shape[3]])  # [batch, seq, n_embd]


def write_cache(cache, new, pos):
    """cache [batch, n_head, cache_len, head_dim] with row b's slots pos[b].. set to new [batch, n_head, seq, ..]."""
    batch, n_head, seq = tf.shape(new)[0], tf.shape(new)[1], tf.shape(new)[2]
    b, h, t = tf.meshgrid(tf.range(batch), tf.range(n_head), tf.range(seq), indexing="ij")
    index = tf.stack([b, h, tf.gather(pos, b) + t], axis=-1)  # [batch, n_head, seq, 3]
    # A scatter, not a rebuilt tensor: compiled with XLA inside a loop, it writes in place.
    return tf.tensor_scatter_nd_update(cache, index, new)


def attention(x, p, past, pos, n_head, shared=None):
    """Causal self-attention of x [batch, seq, n_embd]; row b's tokens go to slots pos[b].. of its cache.

    `shared` is this block's (keys, values) [n_head, shared_len, head_dim] of the n_shared positions
    before every row's own ones, and n_shared, or None. Returns the output and the block's cache
    (keys, values) with this chunk written in.
    """
    q, k, v = tf.split(linear(x, p["c_attn"]), 3, axis=-1)
    q, k, v = (split_heads(t, n_head) for t in (q, k, v))
    keys, values = write_cache(past[0], k, pos), write_cache(past[1], v, pos)
    scores = tf.matmul(q, keys, transpose_b=True)  # [batch, n_head, seq, cache_len]
    # Query i of row b (in slot pos[b] + i) sees the slots up to its own; later slots are empty or
    # hold padding.
    query_slot = pos[:, None] + tf.range(tf.shape(q)[2])[None, :]  # [batch, seq]
    visible = tf.range(tf.shape(keys)[2])[None, None, :] <= query_slot[:, :, None]  # [batch, seq, cache_len]
    visible = tf.broadcast_to(visible[:, None], tf.shape(scores))
    if shared is not None:
        (shared_keys, shared_values), n_shared = shared
        # One product for all rows: the shared keys are read once, not once per row.
        shared_scores = tf.einsum("bhtd,hsd->bhts", q, shared_keys)  # [batch, n_head, seq, shared_len]
        shared_visible = tf.broadcast_to(tf.range(tf.shape(shared_keys)[1]) < n_shared, tf.shape(shared_scores))
        scores = tf.concat([shared_scores, scores], axis=-1)
        visible = tf.concat([shared_visible, visible], axis=-1)
    scores = tf.cast(scores, tf.float32) / math.sqrt(q.shape[-1])
    probs = tf.cast(tf.nn.softmax(tf.where(visible, scores, tf.constant(-1e10, scores.dtype)), axis=-1), values.dtype)
    if shared is not None:
        shared_probs, probs = tf.split(probs, [tf.shape(shared_keys)[1], tf.shape(keys)[2]], axis=-1)
        out = tf.einsum("bhts,hsd->bhtd", shared_probs, shared_values) + tf.matmul(probs, values)
    else:
        out = tf.matmul(probs, values)
    return linear(merge_heads(out), p["c_proj"]), (keys, values)


def mlp(x, p):
    return linear(gelu(linear(x, p["c_fc"])), p["c_proj"])


def block(x, p, past, pos, n_head, shared=None):
    a, present = attention(layer_norm(x, p["ln_1"]), p["attn"], past, pos, n_head, shared)
    x = x + a
    x = x + mlp(layer_norm(x, p["ln_2"]), p["mlp"])
    return x, present


def empty_cache(hparams, batch_size, cache_len, dtype=tf.float32):
    """The cache ("past") before any token: (keys, values) of zeros for each block, in the weights' dtype."""
    shape = [batch_size, hparams.n_head, cache_len, hparams.n_embd // hparams.n_head]
    return [(tf.zeros(shape, dtype), tf.zeros(shape, dtype)) for _ in range(hparams.n_layer)]


def forward(params, hparams, tokens, past, pos, shared=None):
    """Run tokens [batch, seq] through the transformer, row b's into slots pos[b]..pos[b]+seq-1 of past.

    `pos` is one start slot for all rows, or one per row [batch]. With `shared` = (a shared cache as
    in the module's docstring, n_shared), slot s of a row's own cache is position n_shared + s;
    without it, slot s is position s. Returns the final hidden states [batch, seq, n_embd] (after
    ln_f) and the updated cache.
    """
    pos = tf.broadcast_to(tf.cast(pos, tf.int32), tf.shape(tokens)[:1])
    positions = pos[:, None] + tf.range(tf.shape(tokens)[1])[None, :]
    if shared is not None:
        positions += tf.cast(shared[1], tf.int32)
    x = tf.gather(params["wte"], tokens) + tf.gather(params["wpe"], positions)
    presents = []
    for i, (p, layer_past) in enumerate(zip(params["h"], past)):
        x, present = block(x, p, layer_past, pos, hparams.n_head, None if shared is None else (shared[0][i], shared[1]))
        presents.append(present)
    return layer_norm(x, params["ln_f"]), presents


def logits(params, h):
    """Next-token logits [..., n_vocab], float32, from hidden states, through the tied token embedding."""
    return tf.cast(tf.matmul(h, params["wte"], transpose_b=True), tf.float32)
