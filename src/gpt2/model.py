"""GPT-2 as pure functions over a params tree that mirrors OpenAI's checkpoint.

    params["wte"]  [n_vocab, n_embd]   token embedding, also the output layer (tied)
    params["wpe"]  [n_ctx, n_embd]     position embedding
    params["h"][i] one transformer block: ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj
    params["ln_f"] the final layer norm

Each linear layer is {"w": [n_in + 1, n_out]}: the checkpoint's w [n_in, n_out] with its bias b
appended as the last row (see `linear`). Each layer norm is {"g": [n], "b": [n]}. A linear layer
being fine-tuned with low-rank adapters (gpt2.train's lora_rank) also has "lora_a" [n_in, rank]
and "lora_b" [rank, n_out]: it computes x @ (w + lora_a @ lora_b), as the saved folder's merged w will.
The weights may be float32 (as stored), float16 or bfloat16: the computation runs in their dtype,
except layer norm statistics, attention softmax and the logits, which stay in float32.

Two passes are built from the same blocks:
- `forward`: a whole sequence at once, each token attending to the ones before it (scoring, training).
- `forward_cached`: tokens that continue earlier ones whose keys and values are in a cache (decoding).
  The cache has a fixed size, one `LayerCache` of [batch, n_head, cache_len, head_dim] per block,
  so that each new token costs one step and the shapes stay the same from step to step (what a
  compiled decoding loop needs). Each row of a batch has its own position, so prompts of
  different lengths can share a batch.
  Rows that start with the same tokens (several samples of one prompt) may keep those tokens'
  keys and values once, in a `SharedPrefix` without a batch dimension; each row's own cache then
  starts at position n_shared. Decoding reads every cached key and value at every step, so this
  reads the prompt once per step instead of once per row.
"""
import math
from typing import List, NamedTuple

import tensorflow as tf


class LayerCache(NamedTuple):
    """One block's keys and values of earlier positions: [batch, n_head, cache_len, head_dim] each
    ([n_head, shared_len, head_dim] in a SharedPrefix)."""
    keys: tf.Tensor
    values: tf.Tensor


class SharedPrefix(NamedTuple):
    """The first `length` positions of every row, cached once for all rows (a LayerCache per block)."""
    layers: List[LayerCache]
    length: tf.Tensor


def gelu(x):
    # The tanh approximation, as GPT-2 was trained with.
    return 0.5 * x * (1.0 + tf.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def layer_norm(x, p, eps=1e-5):
    # [..., n] -> [..., n]
    x32 = tf.cast(x, tf.float32)  # float16 would overflow in the variance
    mean, variance = tf.nn.moments(x32, axes=[-1], keepdims=True)
    return tf.cast((x32 - mean) * tf.math.rsqrt(variance + eps), x.dtype) * p["g"] + p["b"]


def linear(x, p):
    """[..., n_in] -> [..., n_out]: x @ w + b, as one product of [x, 1] and p["w"], whose last row is b.

    A bias added after the product is fused into it by XLA on a CPU, which then runs a slower
    matrix-vector kernel: one row per step decodes faster this way.
    """
    out = tf.matmul(tf.pad(x, [[0, 0]] * (len(x.shape) - 1) + [[0, 1]], constant_values=1), p["w"])
    if "lora_a" in p:  # through the rank-r bottleneck: no [n_in, n_out] product is formed
        out += tf.matmul(tf.matmul(x, p["lora_a"]), p["lora_b"])
    return out


def mlp(x, p):
    # [batch, seq, n_embd] -> [batch, seq, n_embd]
    return linear(gelu(linear(x, p["c_fc"])), p["c_proj"])


def split_heads(x, n_head):
    # [batch, seq, n_embd] -> [batch, n_head, seq, head_dim]
    x = tf.reshape(x, tf.concat([tf.shape(x)[:2], [n_head, x.shape[-1] // n_head]], axis=0))
    return tf.transpose(x, [0, 2, 1, 3])


def merge_heads(x):
    # [batch, n_head, seq, head_dim] -> [batch, seq, n_embd]
    x = tf.transpose(x, [0, 2, 1, 3])
    return tf.reshape(x, tf.concat([tf.shape(x)[:2], [x.shape[2] * x.shape[3]]], axis=0))


def attention_weights(scores, visible, dtype):
    """Softmax over keys of scores [..., seq, n_keys] (float32, scaled), where `visible`; in `dtype`."""
    return tf.cast(tf.nn.softmax(tf.where(visible, scores, tf.constant(-1e10, scores.dtype)), axis=-1), dtype)


def causal_attention(q, k, v):
    # q, k, v [batch, n_head, seq, head_dim] -> [batch, n_head, seq, head_dim]; token i sees tokens 0..i
    seq = tf.range(tf.shape(q)[2])
    visible = seq[None, :] <= seq[:, None]  # [seq, seq]
    scores = tf.cast(tf.matmul(q, k, transpose_b=True), tf.float32) / math.sqrt(q.shape[-1])
    return tf.matmul(attention_weights(scores, visible, v.dtype), v)


class Slots(NamedTuple):
    """Where tokens that continue a cache go, and what each of them sees: the same in every block."""
    index: tf.Tensor  # [batch, n_head, seq, 3] the cache element (row, head, slot) of each new key and value
    visible: tf.Tensor  # [batch, 1, seq, cache_len] whether query i of row b sees slot s of its row's cache


def cache_slots(pos, seq, n_head, cache_len):
    """The Slots of seq tokens per row going into slots pos[b].. of a cache of cache_len slots, pos [batch].

    Query i of row b (in slot pos[b] + i) sees the slots up to its own; later slots are empty or
    hold padding.
    """
    batch = tf.shape(pos)[0]
    b, h, t = tf.meshgrid(tf.range(batch), tf.range(n_head), tf.range(seq), indexing="ij")
    index = tf.stack([b, h, tf.gather(pos, b) + t], axis=-1)
    query_slot = pos[:, None] + tf.range(seq)[None, :]  # [batch, seq]
    visible = tf.range(cache_len)[None, None, :] <= query_slot[:, :, None]  # [batch, seq, cache_len]
    return Slots(index, visible[:, None])


def cached_attention(q, k, v, past, slots, shared=None):
    """Attention of tokens that continue a cache: q, k, v [batch, n_head, seq, head_dim] -> the same
    shape, and `past` (a LayerCache) with k and v written into their `slots` (see `cache_slots`).

    `shared` is this block's LayerCache of the n_shared positions before every row's own ones,
    and n_shared, or None.
    """
    # Scatters, not rebuilt tensors: compiled with XLA inside a loop, they write in place.
    present = LayerCache(tf.tensor_scatter_nd_update(past.keys, slots.index, k),
                         tf.tensor_scatter_nd_update(past.values, slots.index, v))
    scores = tf.matmul(q, present.keys, transpose_b=True)  # [batch, n_head, seq, cache_len]
    visible = tf.broadcast_to(slots.visible, tf.shape(scores))
    if shared is not None:
        shared_cache, n_shared = shared
        # One product for all rows: the shared keys are read once, not once per row.
        shared_scores = tf.einsum("bhtd,hsd->bhts", q, shared_cache.keys)  # [batch, n_head, seq, shared_len]
        shared_visible = tf.broadcast_to(tf.range(tf.shape(shared_cache.keys)[1]) < n_shared, tf.shape(shared_scores))
        scores = tf.concat([shared_scores, scores], axis=-1)
        visible = tf.concat([shared_visible, visible], axis=-1)
    probs = attention_weights(tf.cast(scores, tf.float32) / math.sqrt(q.shape[-1]), visible, v.dtype)
    if shared is None:
        return tf.matmul(probs, present.values), present
    shared_probs, probs = tf.split(probs, [tf.shape(shared_cache.keys)[1], tf.shape(present.keys)[2]], axis=-1)
    out = tf.einsum("bhts,hsd->bhtd", shared_probs, shared_cache.values) + tf.matmul(probs, present.values)
    return out, present


def block(x, p, n_head, attend):
    """One transformer block: [batch, seq, n_embd] -> [batch, seq, n_embd], and what `attend` returns
    beside its output (the updated cache of `cached_attention`, or None).

    `attend(q, k, v)` is how the tokens look at the sequence: q, k, v [batch, n_head, seq, head_dim].
    """
    q, k, v = (split_heads(t, n_head) for t in tf.split(linear(layer_norm(x, p["ln_1"]), p["attn"]["c_attn"]), 3, -1))
    out, present = attend(q, k, v)
    x = x + linear(merge_heads(out), p["attn"]["c_proj"])
    x = x + mlp(layer_norm(x, p["ln_2"]), p["mlp"])
    return x, present


def embed(params, tokens, positions):
    # tokens, positions [batch, seq] -> [batch, seq, n_embd]
    return tf.gather(params["wte"], tokens) + tf.gather(params["wpe"], positions)


def forward(params, hparams, tokens, recompute=False):
    """Hidden states [batch, seq, n_embd] (after ln_f) of tokens [batch, seq] at positions 0..seq-1.

    recompute (training): keep only each block's input for the backward pass, which computes the
    block again to get its gradients (tf.recompute_grad): one block's activations held at a time
    instead of n_layer blocks', for a third more computation.
    """
    def causal_block(x, *weights):
        # The weights come in as arguments (tensors, not variables) so that the recomputation gives their gradients.
        p = tf.nest.pack_sequence_as(params["h"][0], weights)  # every block has the same structure
        return block(x, p, hparams.n_head, lambda q, k, v: (causal_attention(q, k, v), None))[0]

    if recompute:
        causal_block = tf.recompute_grad(causal_block)
    x = embed(params, tokens, tf.range(tf.shape(tokens)[1])[None, :])
    for p in params["h"]:
        x = causal_block(x, *map(tf.convert_to_tensor, tf.nest.flatten(p)))
    return layer_norm(x, params["ln_f"])


def forward_cached(params, hparams, tokens, past, pos, shared=None):
    """Hidden states [batch, seq, n_embd] (after ln_f) of tokens [batch, seq] that continue `past`,
    and `past` (a LayerCache per block) with their keys and values written in.

    Row b's tokens go into slots pos[b]..pos[b]+seq-1 of its cache; `pos` is one start slot for all
    rows, or one per row [batch]. With `shared` (a SharedPrefix), slot s of a row's own cache is
    position shared.length + s; without it, slot s is position s.
    """
    pos = tf.broadcast_to(tf.cast(pos, tf.int32), tf.shape(tokens)[:1])
    positions = pos[:, None] + tf.range(tf.shape(tokens)[1])[None, :]
    if shared is not None:
        positions += tf.cast(shared.length, tf.int32)
    x = embed(params, tokens, positions)
    slots = cache_slots(pos, tf.shape(tokens)[1], hparams.n_head, past[0].keys.shape[2])
    shared_layers = [None] * hparams.n_layer if shared is None else [(layer, shared.length) for layer in shared.layers]
    block = cached_block_graph(x, params["h"][0], past[0], slots, shared_layers[0], hparams.n_head)
    presents = []
    for p, layer_past, layer_shared in zip(params["h"], past, shared_layers):
        x, present = block(x, p, layer_past, slots, layer_shared, n_head=hparams.n_head)
        presents.append(present)
    return layer_norm(x, params["ln_f"]), presents


def cached_block_graph(x, p, past, slots, shared, n_head):
    """cached_block's graph for arguments like these of any batch size, number of tokens and cache
    size: built once (per dtype, and with or without a shared prefix), for every block, the prompt's
    pass and the decoding loop alike (each trace adds to a command's start-up).

    A tf.function builds a graph for the shapes of its first call, and a second, general one at
    the first call of other shapes: every command made both, the prompt's pass then a step.
    """
    def spec(tensor, *unknown_axes):
        return tf.TensorSpec([None if axis in unknown_axes else n for axis, n in enumerate(tensor.shape)], tensor.dtype)

    return cached_block.get_concrete_function(
        spec(x, 0, 1), tf.nest.map_structure(spec, p), LayerCache(spec(past.keys, 0, 2), spec(past.values, 0, 2)),
        Slots(spec(slots.index, 0, 2), spec(slots.visible, 0, 2, 3)),
        None if shared is None else (LayerCache(spec(shared[0].keys, 1), spec(shared[0].values, 1)), spec(shared[1])),
        n_head=n_head)


# One function for every block: inside the compiled decoding loop, its graph is built once, not
# once per block. And lowered to XLA once, not once per block: TensorFlow inlines a function's
# calls before lowering unless it is marked _noinline, and lowering the loop with the 12 calls
# inlined lowered each block again (tanh, rsqrt and exp are slow to lower). XLA inlines
# the calls as it compiles, so the compiled program is the same.
@tf.function(autograph=False, experimental_attributes={"_noinline": True})
def cached_block(x, p, past, slots, shared, *, n_head):
    """`block` of tokens that continue a cache: x [batch, seq, n_embd] -> the same shape, and `past`
    with their keys and values written in (see `cached_attention`)."""
    return block(x, p, n_head, lambda q, k, v: cached_attention(q, k, v, past, slots, shared))


def empty_cache(hparams, batch_size, cache_len, dtype=tf.float32):
    """The cache ("past") before any token: a LayerCache of zeros for each block, in the weights' dtype."""
    shape = [batch_size, hparams.n_head, cache_len, hparams.n_embd // hparams.n_head]
    return [LayerCache(tf.zeros(shape, dtype), tf.zeros(shape, dtype)) for _ in range(hparams.n_layer)]


def logits(params, h):
    """Next-token logits [..., n_vocab], float32, from hidden states [..., n_embd], through the tied token embedding."""
    return tf.cast(tf.matmul(h, params["wte"], transpose_b=True), tf.float32)
