"""Decoding: continue token lists with GPT-2 in compiled TensorFlow loops.

Two functions do the work: `_start` runs the prompts through the model (big matrix products, any
prompt length) and picks the first token, eagerly (each block through model.cached_block's small
graph); `_advance` runs up to n more steps in one XLA-compiled loop. `plan_batch` lays the rows out first: the tokens that all
rows start with (several samples of one prompt) run once, into a cache that all rows share (see
gpt2.model), so that each step reads the prompt's keys and values once, not once per row; and
the cache lengths are rounded up to a few sizes (see `bucket`), so that a new prompt length
rarely means a new compilation. How each token is chosen is gpt2.sampling's job.

These functions trust their arguments: gpt2.api checks what users pass.
"""
import functools
import time
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from .model import LayerCache, SharedPrefix, empty_cache, forward_cached, logits
from .sampling import MIN_TEMPERATURE, Rule, choose, mark_stopped
from .tensorflow_start import compiled


class Batch(NamedTuple):
    """How a batch of token lists is laid out for decoding."""
    prefix: np.ndarray  # [n_shared] the tokens that every row starts with, run once for all rows
    shared_len: int  # slots of the shared cache (0: nothing shared)
    rest: np.ndarray  # [batch, longest] each row's own prompt tokens, then padding
    n_rest: np.ndarray  # [batch] how many of them are the row's
    cache_len: int  # slots of each row's own cache


class Draw(NamedTuple):
    """What each draw depends on, as tensors: they change no compiled code."""
    row_seeds: tf.Tensor  # [batch, 2] (seed, sample number) of each row
    temperature: tf.Tensor
    top_p: tf.Tensor


class State(NamedTuple):
    """Where decoding stands between two compiled calls."""
    cache: list  # a LayerCache per block: each row's own tokens
    token: tf.Tensor  # [batch] the latest token, not yet fed to the model
    pos: tf.Tensor  # [batch] the slot it goes into
    done: tf.Tensor  # [batch] rows that drew the stop token


def shared_prefix_length(contexts):
    """How many tokens all contexts start with, leaving each at least one of its own.

    Each row needs its last prompt token run on its own rows' pass: its logits give the first new token.
    """
    n = min(len(c) for c in contexts) - 1
    for i in range(n):
        if any(c[i] != contexts[0][i] for c in contexts):
            return i
    return n


def bucket(n, limit):
    """n rounded up to one of 16, 24, 32, 48, 64, 96, ... (powers of two and 1.5 times them), at most `limit`.

    Few sizes, so few compilations; and at most a third of the cache is slots that are never
    filled (every step reads the whole cache, so unused slots cost time).
    """
    size = 16
    while size < n:
        size = size // 2 * 3 if size & (size - 1) == 0 else size // 3 * 4
    return min(size, limit)


def plan_batch(contexts, length, n_ctx):
    """The Batch that continues each token list in `contexts` by up to `length` tokens."""
    longest = max(len(c) for c in contexts)
    if not min(len(c) for c in contexts) or longest + length - 1 > n_ctx:
        # The API's checks keep this from happening; a compiled scatter would clamp the slots silently.
        raise ValueError(f"contexts of 1..{n_ctx + 1 - length} tokens are needed for {length} new ones")
    # Rows share the cache of what their prompts start with. A lone row would read as many bytes
    # either way, and the split attention's extra steps would only slow it down.
    n_shared = shared_prefix_length(contexts) if len(contexts) > 1 else 0
    rests = [c[n_shared:] for c in contexts]
    rest = np.zeros([len(contexts), max(len(r) for r in rests)], np.int32)
    for row, tokens in zip(rest, rests):
        row[:len(tokens)] = tokens
    return Batch(prefix=np.array(contexts[0][:n_shared], np.int32),
                 shared_len=bucket(n_shared, n_ctx) if n_shared else 0,
                 rest=rest, n_rest=np.array([len(r) for r in rests], np.int32),
                 cache_len=bucket(rest.shape[1] + length - 1, n_ctx - n_shared))


def decoding_memory(hparams, rows, context_len, length, itemsize):
    """About how many bytes decoding `rows` rows of up to `context_len` prompt tokens and `length`
    new ones needs beyond the weights, in weights of `itemsize` bytes; it grows with the rows.

    The cache dominates: keys and values of every layer and slot, twice while a compiled call
    returns the updated copy of its input (docs/performance.md has 1558M's measured peak). Then
    the prompt's pass, whose largest
    pieces are one layer's attention scores (float32, and the softmax of them) and MLP activations,
    and each step's float32 logits with the copies that sampling makes of them.
    """
    cache_len = bucket(context_len + length - 1, hparams.n_ctx)  # as plan_batch lays it out, unshared
    cache = 2 * hparams.n_layer * cache_len * hparams.n_embd * itemsize
    prompt_pass = context_len * (2 * hparams.n_head * cache_len * 4 + 2 * 4 * hparams.n_embd * itemsize)
    step = 4 * hparams.n_vocab * 4
    return rows * (2 * cache + prompt_pass + step)


def raises_ctrl_c(function):
    """`function` (a tf.function, or one that calls some) with Ctrl-C raised as the KeyboardInterrupt
    that Python raises.

    A tf.function reads its arguments' types under a bare `except:` that turns any exception into
    a TypeError; a Ctrl-C landing there would end a command with that traceback instead of its
    "interrupted" message (seen once in CI). The KeyboardInterrupt is still in the TypeError's context.
    """
    @functools.wraps(function, assigned=("__name__", "__doc__"), updated=())
    def call(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception as e:
            context = e.__context__
            while context is not None:
                if isinstance(context, KeyboardInterrupt):
                    raise KeyboardInterrupt from e
                context = context.__context__
            raise
    return call


# Not a tf.function: the prompt's pass is a few large products per block, which run as fast
# eagerly (each block a call of model.cached_block's graph, built once for all blocks), while
# building the whole pass's graph would be paid again at every start of a command.
@raises_ctrl_c
def _start(params, prefix, rest, n_rest, draw, *, hparams, rule, shared_len, cache_len):
    """Run the prompts through the model and pick each row's first token.

    prefix [n_shared] runs once, into a shared cache of shared_len slots, or not at all when
    shared_len is 0. rest [batch, longest] (row b's own n_rest[b] tokens, then padding, which later
    steps overwrite in the cache and no real token attends to) runs in one pass.
    Returns the SharedPrefix (or None) and the State.
    """
    dtype = params["wte"].dtype
    shared = None
    if shared_len:
        _, one_row = forward_cached(params, hparams, prefix[None], empty_cache(hparams, 1, shared_len, dtype), 0)
        shared = SharedPrefix([LayerCache(layer.keys[0], layer.values[0]) for layer in one_row], tf.size(prefix))
    cache = empty_cache(hparams, tf.shape(rest)[0], cache_len, dtype)
    h, cache = forward_cached(params, hparams, rest, cache, 0, shared)
    last = tf.gather(h, n_rest - 1, batch_dims=1)  # [batch, n_embd] at each row's last real token
    token = choose(logits(params, last), 0, draw.row_seeds, draw.temperature, draw.top_p, rule)
    token, done = mark_stopped(token, tf.zeros_like(token, tf.bool), rule)
    return shared, State(cache, token, n_rest, done)


# autograph=False here and on gpt2's other compiled functions: their loops and branches are
# tf.while_loop and tf.cond already, and autograph's rewriting of every function they call was
# most of the decoding loop's tracing time.
@raises_ctrl_c
@compiled(jit_compile=True)
def _advance(params, shared, state, first_step, n_steps, draw, *, hparams, rule):
    """Up to n_steps more tokens in one loop, fewer if every row is done.

    Returns the new State, the tokens [batch, cache_len] (the first `steps` columns are new) and steps.
    """
    out = tf.zeros([tf.shape(state.token)[0], state.cache[0].keys.shape[2]], tf.int32)

    def body(i, state, out):
        h, cache = forward_cached(params, hparams, state.token[:, None], state.cache, state.pos, shared)
        token = choose(logits(params, h[:, -1]), first_step + i, draw.row_seeds, draw.temperature, draw.top_p, rule)
        token, done = mark_stopped(token, state.done, rule)
        column = tf.stack([tf.range(tf.shape(token)[0]), tf.fill(tf.shape(token), i)], axis=-1)
        return i + 1, State(cache, token, state.pos + 1, done), tf.tensor_scatter_nd_update(out, column, token)

    steps, state, out = tf.while_loop(lambda i, state, out: (i < n_steps) & ~tf.reduce_all(state.done),
                                      body, (tf.constant(0), state, out))
    return state, out, steps


def sampling_settings(hparams, rows, temperature, top_k, top_p, seed, first_sample, stop_token):
    """The Rule and the Draw of `rows` rows, samples first_sample, first_sample + 1, ... of `seed`."""
    rule = Rule(greedy=temperature == 0, top_k=min(top_k, hparams.n_vocab), use_top_p=top_p < 1,
                stop_token=stop_token)
    return rule, Draw(tf.constant(row_seeds(rows, seed, first_sample)),
                      tf.constant(max(temperature, MIN_TEMPERATURE), tf.float32), tf.constant(top_p, tf.float32))


def row_seeds(rows, seed, first_sample):
    """[rows, 2] int64: each row's (seed, sample number), the numbers its draws are keyed by."""
    return np.array([[seed, first_sample + row] for row in range(rows)], np.int64)


def sample_chunks(params, hparams, contexts, length, *, temperature=1.0, top_k=0, top_p=1.0, seed=0,
                  first_sample=0, stop_token=None, chunk_size=None, chunk_seconds=None, strategy=None):
    """Continue each token list in `contexts` (one row each), yielding new tokens as they come.

    Yields arrays [rows, k]: the first token of every row, then up to `chunk_size` tokens at a
    time (all the rest at once if None), `length` in all unless every row has stopped. With
    `chunk_seconds`, each compiled call after the first two makes as many tokens as the call
    before made in that time (at least one): the first call compiles the loop, the second
    measures its pace. A row that drew `stop_token` repeats it from then on. Row r is sample
    number first_sample + r of `seed`: the same seed and sample number give the same tokens,
    whatever the batch or the chunk size.

    With a tf.distribute.Strategy of several replicas, the rows are shared out in equal parts, in
    order (the last row is repeated to fill the last part, and its copies dropped), and each
    replica runs the compiled loop on its part; `params` is then the weights as the strategy's
    per-replica values (see `replicated`), so that each replica reads its own copy.
    """
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    n_rows = len(contexts)
    contexts = list(contexts) + [contexts[-1]] * (-n_rows % replicas)
    batch = plan_batch(contexts, length, hparams.n_ctx)
    share = len(contexts) // replicas

    def each_replica(rows):  # rows [len(contexts), ...] as each replica's part of them
        return strategy.experimental_distribute_values_from_function(
            lambda context: tf.constant(rows[context.replica_id_in_sync_group * share:][:share]))

    def together(per_replica):  # the replicas' [share, ...] parts as one array [n_rows, ...]
        return np.concatenate([part.numpy() for part in strategy.experimental_local_results(per_replica)])[:n_rows]

    rule, draw = sampling_settings(hparams, len(contexts), temperature, top_k, top_p, seed, first_sample, stop_token)
    row_seeds = each_replica(draw.row_seeds.numpy())
    temperature, top_p = draw.temperature, draw.top_p

    def start(params, rest, n_rest, row_seeds):
        return _start(params, tf.constant(batch.prefix), rest, n_rest, Draw(row_seeds, temperature, top_p),
                      hparams=hparams, rule=rule, shared_len=batch.shared_len, cache_len=batch.cache_len)

    def advance(params, shared, state, first_step, n_steps, row_seeds):
        return _advance(params, shared, state, first_step, n_steps, Draw(row_seeds, temperature, top_p),
                        hparams=hparams, rule=rule)

    shared, state = strategy.run(start, args=(params, each_replica(batch.rest), each_replica(batch.n_rest),
                                              row_seeds))
    yield together(state.token)[:, None]
    made, done = 1, together(state.done).all()
    seconds_per_token = None  # of the last call, once the loop is compiled
    while made < length and not done:
        n = length - made if chunk_size is None else min(chunk_size, length - made)
        if chunk_seconds is not None:
            n = min(n, 1 if seconds_per_token is None else max(1, int(chunk_seconds / seconds_per_token)))
        started = time.perf_counter()
        state, out, steps = strategy.run(advance, args=(params, shared, state, tf.constant(made), tf.constant(n),
                                                        row_seeds))
        # A replica whose rows have all stopped ends its loop early: its rows repeat the stop token.
        steps = [int(s) for s in strategy.experimental_local_results(steps)]
        new = max(steps)
        outs = [out.numpy()[:, :new] for out in strategy.experimental_local_results(out)]
        for out, s in zip(outs, steps):
            if s < new:
                out[:, s:] = stop_token
        if chunk_seconds is not None and made > 1:  # not the call that compiled the loop
            seconds_per_token = (time.perf_counter() - started) / new
        made += new
        done = together(state.done).all()
        yield np.concatenate(outs)[:n_rows]


def replicated(params, strategy):
    """The weights as `strategy`'s per-replica values: a copy on each replica's device."""
    def copy(context):  # the strategy leaves the placing to us
        with tf.device(strategy.extended.worker_devices[context.replica_id_in_sync_group]):
            return tf.nest.map_structure(tf.identity, params)
    return strategy.experimental_distribute_values_from_function(copy)


def sample(params, hparams, context, length, *, batch_size=1, temperature=1.0, top_k=0, top_p=1.0, seed=0,
           first_sample=0, stop_token=None):
    """`batch_size` continuations of the token list `context`, each a list of at most `length` tokens.

    A row ends before `stop_token` (which is not returned) when it is given. Rows are samples
    first_sample, first_sample + 1, ... of `seed` (see `sample_chunks`).
    """
    chunks = list(sample_chunks(params, hparams, [list(context)] * batch_size, length, temperature=temperature,
                                top_k=top_k, top_p=top_p, seed=seed, first_sample=first_sample,
                                stop_token=stop_token))
    rows = []
    for row in np.concatenate(chunks, axis=1).tolist():
        if stop_token is not None and stop_token in row:
            row = row[:row.index(stop_token)]
        rows.append(row)
    return rows
