"""float32, bfloat16 and float16 decoding: gpt2.engine's rows, stepped in an XLA-compiled loop.

XlaEngine keeps its rows as tensors (State): each row's own slots of the cache, and its latest
token, position, draw numbers and flags (Rows). `admit` runs the new rows' prompts through the
model eagerly (big matrix products of any prompt length: each block a call of
model.cached_block's graph) into the rows' slots. `step` runs up to n steps in one XLA-compiled
loop, `_advance`, which all engines share: it is traced once per number of rows, of cache slots
(rounded up to a few sizes by gpt2.engine.bucket) and of shared slots, never per request or flag.
The tokens that every row starts with (the prompt of several samples) are run once, into a cache
that all rows read (see gpt2.model), so that each step reads the prompt's keys and values once,
not once per row. How each token is chosen is gpt2.sampling's job.
"""
import contextlib
import functools
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from .engine import MAX_LOGPROBS, Adjustments, Engine, Logprobs, Rows, bucket
from .model import LayerCache, SharedPrefix, empty_cache, forward_cached, logits
from .sampling import Draws, adjust, choose, top_logprobs
from .tensorflow_start import compiled


class State(NamedTuple):
    """An engine's rows between two compiled calls."""
    cache: list  # a LayerCache per block: [rows, n_head, cache_len, head_dim] each, the rows' own tokens
    rows: Rows  # of tensors


class XlaEngine(Engine):
    """gpt2.engine's interface on a params tree (see gpt2.model), on `device` (None: the default one)."""

    def __init__(self, params, hparams, rows, prefix=(), device=None):
        # A lone row would read as many bytes either way, and the split attention's extra steps
        # would only slow it down: it keeps its whole prompt in its own slots.
        super().__init__(hparams, rows, prefix if rows > 1 else ())
        self.params, self.device = params, device
        self.dtype = params["wte"].dtype
        with self.placed():
            self.shared = self.run_prefix() if self.prefix else None
            self.state = State(empty_cache(hparams, 1, bucket(1, hparams.n_ctx), self.dtype),  # widened as rows come
                               self.tensors(Rows.empty(1, hparams.n_ctx)))

    def placed(self):
        return tf.device(self.device) if self.device else contextlib.nullcontext()

    @staticmethod
    def tensors(rows):
        return Rows(*(tf.constant(value) for value in rows))

    def run_prefix(self):
        """The SharedPrefix of the engine's prefix, run once for all rows."""
        n, hparams = len(self.prefix), self.hparams
        _, one_row = forward_cached(self.params, hparams, tf.constant([self.prefix], tf.int32),
                                    empty_cache(hparams, 1, bucket(n, hparams.n_ctx), self.dtype), 0)
        return SharedPrefix([LayerCache(layer.keys[0], layer.values[0]) for layer in one_row], tf.constant(n))

    def cache_len(self):
        return self.state.cache[0].keys.shape[2]

    def width(self):
        """How many rows the state holds now (see fit_width)."""
        return self.state.rows.token.shape[0]

    def fit_width(self, n):
        """Hold rows 0 to n - 1, in a power of two of rows (at most the engine's).

        Every step computes every row the state holds, live or not: a server's engine of 8 rows
        that serves one request would step 8. So the state holds the rows up to the last one in
        use (rows are given lowest first), rounded up to a power of two: it widens when a row
        beyond them is admitted and narrows when the last ones end, a copy each time; each width
        compiles the loop once per cache size.
        """
        width, now = min(1 << (n - 1).bit_length(), self.rows), self.width()
        if width == now:
            return
        values = self.rows_now()
        if width > now:
            empty = Rows.empty(width - now, self.hparams.n_ctx)
            values = Rows(*(np.concatenate([kept, np.pad(new, [(0, 0)] + [(0, k - e) for k, e in zip(
                kept.shape[1:], new.shape[1:])], constant_values=new.flat[0])]) for kept, new in zip(values, empty)))
            more = [[0, width - now], [0, 0], [0, 0], [0, 0]]
            cache = [LayerCache(tf.pad(layer.keys, more), tf.pad(layer.values, more)) for layer in self.state.cache]
        else:
            values = Rows(*(value[:width] for value in values))
            cache = [LayerCache(layer.keys[:width], layer.values[:width]) for layer in self.state.cache]
        with self.placed():
            self.state = State(cache, self.tensors(values))

    def _admit(self, rows, requests):
        n_prefix, hparams = len(self.prefix), self.hparams
        self.fit_width(max(list(rows) + list(self.live)) + 1)
        own = [list(request.tokens)[n_prefix:] for request in requests]  # each has its last prompt token at least
        values = self.rows_now().admitted(rows, n_prefix, requests, hparams.n_vocab)
        live = values.left > 0  # the rows just admitted among them
        needed = bucket(int((values.pos + values.left)[live].max()), hparams.n_ctx - n_prefix)
        # The slots only grow while rows live (their caches stay where they are); once every row
        # has ended, the next ones start from the size they need (every step reads every slot).
        cache_len = max(self.cache_len(), needed) if self.live else needed
        with self.placed():
            cache = self.state.cache
            if not self.live and cache_len != self.cache_len():
                cache = empty_cache(hparams, self.width(), cache_len, self.dtype)
            elif cache_len > self.cache_len():  # every row's slots grow (a new size: the loop compiles again)
                more = [[0, 0], [0, 0], [0, cache_len - self.cache_len()], [0, 0]]
                cache = [LayerCache(tf.pad(layer.keys, more), tf.pad(layer.values, more)) for layer in cache]
            rests = [tokens[:-1] for tokens in own]
            longest = max(len(rest) for rest in rests)
            if longest:
                # The rows' prompts, but their last tokens, in one pass; each row's padding goes into
                # slots that its queries do not see before its steps overwrite them. Rows with the
                # same prompt (the samples of one) run it once, and their caches start as copies.
                padded = np.array([rest + [0] * (longest - len(rest)) + [len(rest)] for rest in rests], np.int32)
                unique, row_rest = np.unique(padded, axis=0, return_inverse=True)
                _, new = forward_cached(self.params, hparams, tf.constant(unique[:, :-1]),
                                        empty_cache(hparams, len(unique), cache_len, self.dtype), 0, self.shared)
                row_rest = row_rest.reshape(-1)
                if list(row_rest) != list(range(len(rows))):  # in the rows' order, each row's prompt's
                    which = tf.constant(row_rest)
                    new = [LayerCache(tf.gather(layer.keys, which), tf.gather(layer.values, which)) for layer in new]
                if len(rows) == self.width():  # every row is new (rows 0, 1, ...): the pass's cache is the engine's
                    cache = new
                else:
                    index = tf.constant([[row] for row in rows])
                    cache = [LayerCache(tf.tensor_scatter_nd_update(layer.keys, index, added.keys),
                                        tf.tensor_scatter_nd_update(layer.values, index, added.values))
                             for layer, added in zip(cache, new)]
            self.state = State(cache, self.tensors(values))

    def _step(self, n):
        self.fit_width(max(self.live) + 1)
        logprobs = bool(self.logprobs)  # only a loop of its own computes them
        with self.placed():
            self.state, out, steps = _advance(self.params, self.shared, self.state,
                                              tf.constant(min(n, self.cache_len())), hparams=self.hparams,
                                              logprobs=logprobs)
        steps = int(steps)
        made = Logprobs(*(values.numpy()[:, :steps] for values in out[1:])) if logprobs else None
        return out.tokens.numpy()[:, :steps], self.state.rows.left.numpy() > 0, made

    def rows_now(self):
        """The rows' values, as NumPy arrays to change."""
        return Rows(*(t.numpy() for t in self.state.rows)).copy()

    def _release(self, row):
        if row >= self.width():  # it ended, and the state narrowed past it
            return
        values = self.rows_now()
        values.free(row)
        with self.placed():
            self.state = self.state._replace(rows=self.tensors(values))


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


def replicated(params, strategy):
    """The weights as `strategy`'s per-replica values: a copy on each replica's device."""
    def copy(context):  # the strategy leaves the placing to us
        with tf.device(strategy.extended.worker_devices[context.replica_id_in_sync_group]):
            return tf.nest.map_structure(tf.identity, params)
    return strategy.experimental_distribute_values_from_function(copy)


# autograph=False here and on gpt2's other compiled functions: their loops and branches are
# tf.while_loop and tf.cond already, and autograph's rewriting of every function they call was
# most of the decoding loop's tracing time.
class Out(NamedTuple):
    """What a compiled call made: column i holds step i's (tokens -1 for rows not live)."""
    tokens: tf.Tensor  # [rows, cache_len] int32
    chosen: tf.Tensor  # [rows, cache_len] float32: each token's log-probability ...
    top_tokens: tf.Tensor  # [rows, cache_len, MAX_LOGPROBS] int32: ... and the most likely tokens' ...
    top_logprobs: tf.Tensor  # [rows, cache_len, MAX_LOGPROBS] float32 (all three empty without logprobs)


@raises_ctrl_c
@compiled(jit_compile=True)
def _advance(params, shared, state, n_steps, *, hparams, logprobs):
    """Up to n_steps more tokens for every live row of `state`, fewer once all rows have ended;
    with `logprobs`, their log-probabilities too.

    Returns the new State, the Out and how many steps it took.
    """
    n_rows, cache_len = tf.shape(state.rows.token)[0], state.cache[0].keys.shape[2]
    width = cache_len if logprobs else 0
    out = Out(tf.fill([n_rows, cache_len], -1), tf.zeros([n_rows, width]),
              tf.zeros([n_rows, width, MAX_LOGPROBS], tf.int32), tf.zeros([n_rows, width, MAX_LOGPROBS]))

    def body(i, state, out):
        rows = state.rows
        live = rows.left > 0
        # Rows not live are fed too (the batch has one shape), into a slot of their own that no live query sees.
        h, cache = forward_cached(params, hparams, rows.token[:, None], state.cache,
                                  tf.minimum(rows.pos, cache_len - 1), shared)
        next_logits = logits(params, h[:, -1])
        adjusted = adjust(next_logits, Adjustments(*(getattr(rows, name) for name in Adjustments._fields)))
        token = choose(adjusted, Draws(rows.row_seeds, rows.made, rows.temperature, rows.top_k, rows.top_p,
                                       rows.min_p))
        token = tf.where(live, token, -1)
        stepped = tf.cast(live, tf.int32)
        left = tf.where(token == rows.stop_token, 0, rows.left - stepped)
        text_end = tf.stack([tf.range(n_rows), tf.minimum(rows.text_len, rows.history.shape[1] - 1)], axis=-1)
        rows = rows._replace(token=tf.where(live, token, rows.token), pos=rows.pos + stepped,
                             made=rows.made + stepped, left=left,
                             temperature=tf.where(left > 0, rows.temperature, 0.0),
                             history=tf.tensor_scatter_nd_update(rows.history, text_end,
                                                                 tf.where(live, token, rows.token)),
                             text_len=rows.text_len + stepped)
        column = tf.stack([tf.range(n_rows), tf.fill([n_rows], i)], axis=-1)
        made = [token]
        if logprobs:
            top_values, top_tokens, all_logprobs = top_logprobs(next_logits, MAX_LOGPROBS)
            made += [tf.gather(all_logprobs, tf.maximum(token, 0), batch_dims=1), top_tokens, top_values]
        out = Out(*(tf.tensor_scatter_nd_update(to, column, new) for to, new in zip(out, made)),
                  *out[len(made):])
        return i + 1, State(cache, rows), out

    steps, state, out = tf.while_loop(lambda i, state, out: (i < n_steps) & tf.reduce_any(state.rows.left > 0),
                                      body, (tf.constant(0), state, out))
    return state, out, steps
