"""Sampling text from GPT-2 with compiled TensorFlow loops.

Each step turns logits into a token: greedy argmax when temperature is 0, otherwise
logits / temperature, cut to the top_k most likely tokens and to the top_p nucleus, then a draw
from a stateless random generator keyed by (seed, sample number, step), so that the same seed and
flags give the same samples, run after run, whatever the batch size or the chunks.

Two compiled functions do the work: `_start` runs the prompts through the model (a TensorFlow
graph: big matrix products, any prompt length) and picks the first token; `_advance` runs up to n
more steps in one XLA-compiled loop, whose cache lengths are rounded up to a few sizes (see
`bucket`) so that a new prompt length rarely means a new compilation. When the rows' prompts start
alike (several samples of one prompt), `_start` runs those tokens once, into a cache that all rows
share (see gpt2.model): each step then reads the prompt's keys and values once, not once per row.
"""
import functools
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from .errors import GPT2Error
from .model import empty_cache, forward, logits


def top_k_filter(logits, k):
    """Logits [batch, n_vocab] with all but the k largest of each row set to -inf."""
    kth_largest = tf.math.top_k(logits, k=k).values[:, -1:]
    return tf.where(logits < kth_largest, tf.constant(-np.inf, logits.dtype), logits)


def top_p_filter(logits, p):
    """Logits [batch, n_vocab] cut to the nucleus of Holtzman et al. (2019).

    The nucleus is the smallest set of most likely tokens whose probabilities add up to at least p:
    it includes the token whose probability crosses p. (OpenAI's original code stopped just
    before that token.) Tokens tied with the least likely one kept are kept too.
    """
    sorted_logits = tf.sort(logits, direction="DESCENDING")
    mass_before = tf.cumsum(tf.nn.softmax(sorted_logits), axis=-1, exclusive=True)
    n_kept = tf.reduce_sum(tf.cast(mass_before < p, tf.int32), axis=-1)  # >= 1: the first has mass 0 before it
    least_kept = tf.gather(sorted_logits, n_kept - 1, batch_dims=1)
    return tf.where(logits < least_kept[:, None], tf.constant(-np.inf, logits.dtype), logits)


class Rule(NamedTuple):
    """How a token is chosen: the settings that change the compiled code (not temperature or top_p)."""
    greedy: bool
    top_k: int
    use_top_p: bool
    stop_token: object  # int or None


def choose(next_logits, step, row_seeds, temperature, top_p, rule):
    """Tokens [batch] picked from logits [batch, n_vocab] at generation step `step`.

    Each row draws with its own seed (row_seeds [batch, 2]), by the Gumbel-max trick: the argmax
    of logits plus Gumbel noise is a draw from their softmax. So a sample's tokens depend on its
    seed alone, not on which batch it shares or how large that batch is.
    """
    if rule.greedy:
        return tf.argmax(next_logits, axis=-1, output_type=tf.int32)
    next_logits = next_logits / temperature
    if rule.top_k:
        next_logits = top_k_filter(next_logits, rule.top_k)
    if rule.use_top_p:
        next_logits = top_p_filter(next_logits, top_p)
    noise = uniform_noise(row_seeds, step, next_logits.shape[1])
    gumbel = -tf.math.log(-tf.math.log(noise))
    return tf.argmax(next_logits + gumbel, axis=-1, output_type=tf.int32)


def _mix64(z):
    """The SplitMix64 finalizer: a bijection of uint64 whose outputs look independent of its inputs."""
    shift = lambda z, n: tf.bitwise.right_shift(z, tf.constant(n, tf.uint64))  # noqa: E731
    z = tf.bitwise.bitwise_xor(z, shift(z, 30)) * tf.constant(0xBF58476D1CE4E5B9, tf.uint64)
    z = tf.bitwise.bitwise_xor(z, shift(z, 27)) * tf.constant(0x94D049BB133111EB, tf.uint64)
    return tf.bitwise.bitwise_xor(z, shift(z, 31))


@tf.function(jit_compile=True)  # compiled even from the prefill graph: TensorFlow's own kernels lack uint64 ops
def uniform_noise(row_seeds, step, n):
    """Uniform numbers in (0, 1), [batch, n]: row b's are draws step * n + 1 ... step * n + n of the
    SplitMix64 stream keyed by row_seeds[b] = (seed, sample number).

    A counter-based generator: every number is a function of (seed, sample, step, index) alone, so
    all rows and tokens are computed at once, with no state and no loop over rows.
    """
    seeds = tf.cast(row_seeds, tf.uint64)
    key = _mix64(tf.bitwise.bitwise_xor(_mix64(seeds[:, 0]), seeds[:, 1]))  # [batch]
    counter = tf.cast(step, tf.uint64) * n + tf.cast(tf.range(1, n + 1, dtype=tf.int64), tf.uint64)  # [n]
    bits = _mix64(key[:, None] + counter[None, :] * tf.constant(0x9E3779B97F4A7C15, tf.uint64))
    # The top 23 bits, centred in their interval: exact in float32, never 0 or 1 (both would make log infinite).
    return (tf.cast(tf.bitwise.right_shift(bits, tf.constant(41, tf.uint64)), tf.float32) + 0.5) * 2.0 ** -23


def mark_stopped(token, done, rule):
    """Rows that drew the stop token are done; finished rows only repeat it."""
    if rule.stop_token is None:
        return token, done
    token = tf.where(done, rule.stop_token, token)
    return token, done | tf.equal(token, rule.stop_token)


def raises_ctrl_c(function):
    """`function`, a tf.function, with Ctrl-C raised as the KeyboardInterrupt that Python raises.

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


@raises_ctrl_c
@tf.function(reduce_retracing=True)
def _start(params, prefix, context, n_context, row_seeds, temperature, top_p, *, hparams, rule, shared_len,
           cache_len):
    """Run the prompts through the model and pick each row's first token.

    prefix [n_shared] is what every prompt starts with: it runs once, into a shared cache of
    shared_len slots (see gpt2.model), or not at all when shared_len is 0. context [batch, longest]
    holds the rest of row b's prompt, n_context[b] tokens, then padding (which later steps
    overwrite in the cache, and no real token attends to); it runs in one pass. Returns the shared
    cache (or None) and the decoding state: (cache, token [batch] not yet fed, its slot [batch], done [batch]).
    """
    dtype = params["wte"].dtype
    shared = None
    if shared_len:
        _, one_row = forward(params, hparams, prefix[None], empty_cache(hparams, 1, shared_len, dtype), 0)
        shared = ([(keys[0], values[0]) for keys, values in one_row], tf.size(prefix))
    past = empty_cache(hparams, tf.shape(context)[0], cache_len, dtype)
    h, past = forward(params, hparams, context, past, 0, shared)
    last = tf.gather(h, n_context - 1, batch_dims=1)  # [batch, n_embd] at each row's last real token
    token = choose(logits(params, last), 0, row_seeds, temperature, top_p, rule)
    token, done = mark_stopped(token, tf.zeros_like(token, tf.bool), rule)
    return shared, (past, token, n_context, done)


@raises_ctrl_c
@tf.function(jit_compile=True)
def _advance(params, shared, state, first_step, n_steps, row_seeds, temperature, top_p, *, hparams, rule):
    """Up to n_steps more tokens in one loop, fewer if every row is done.

    Returns the new state, the tokens [batch, cache_len] (the first `steps` columns are new) and steps.
    """
    past, token, pos, done = state
    out = tf.zeros([tf.shape(token)[0], past[0][0].shape[2]], tf.int32)

    def body(i, past, token, pos, done, out):
        h, past = forward(params, hparams, token[:, None], past, pos, shared)
        token = choose(logits(params, h[:, -1]), first_step + i, row_seeds, temperature, top_p, rule)
        token, done = mark_stopped(token, done, rule)
        column = tf.stack([tf.range(tf.shape(token)[0]), tf.fill(tf.shape(token), i)], axis=-1)
        return i + 1, past, token, pos + 1, done, tf.tensor_scatter_nd_update(out, column, token)

    steps, past, token, pos, done, out = tf.while_loop(
        lambda i, past, token, pos, done, out: (i < n_steps) & ~tf.reduce_all(done),
        body, (tf.constant(0), past, token, pos, done, out))
    return (past, token, pos, done), out, steps


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


def check_sampling_flags(length, temperature, top_k, top_p):
    """A GPT2Error naming the first impossible value; numbers come from the command line."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise GPT2Error(f"--length must be a whole number of at least 1, not {length!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0 \
            or temperature == float("inf"):
        raise GPT2Error(f"--temperature must be a number >= 0 (0 means always the most likely token), "
                        f"not {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise GPT2Error(f"--top_k must be a whole number >= 0 (0 turns it off), not {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise GPT2Error(f"--top_p must be a number in (0, 1] (1 turns it off), not {top_p!r}")


def check_length(length, n_ctx):
    if length > n_ctx:
        raise GPT2Error(f"--length {length} is more than the model's context of {n_ctx} tokens: "
                        f"ask for {n_ctx} or fewer")


def fit_context(tokens, length, n_ctx, truncate=False):
    """The prompt tokens that fit with `length` new tokens in the model's n_ctx positions.

    The model sees n_ctx tokens at most; the last new token is never fed back to it, so a prompt of
    n tokens leaves room for n_ctx + 1 - n new ones. With `truncate`, a prompt that is too long
    keeps only its last tokens; otherwise it is an error that says how many tokens are left.
    """
    check_length(length, n_ctx)
    room = n_ctx + 1 - length
    if len(tokens) <= room:
        return list(tokens)
    if truncate:
        return list(tokens[len(tokens) - room:])
    raise GPT2Error(f"the prompt is {len(tokens)} tokens, which leaves room for {max(n_ctx + 1 - len(tokens), 0)} "
                    f"new tokens of the model's {n_ctx}, but --length is {length}: shorten the prompt, "
                    f"lower --length, or pass --truncate_prompt to keep only the prompt's last {room} tokens")


def sample_chunks(params, hparams, contexts, length, *, temperature=1.0, top_k=0, top_p=1.0, seed=0,
                  first_sample=0, stop_token=None, chunk_size=None):
    """Continue each token list in `contexts` (one row each), yielding new tokens as they come.

    Yields arrays [rows, k]: the first token of every row, then up to `chunk_size` tokens at a
    time (all the rest at once if None), `length` in all unless every row has stopped. A row that
    drew `stop_token` repeats it from then on. Row r is sample number first_sample + r of `seed`:
    the same seed and sample number give the same tokens, whatever the batch or the chunk size.
    """
    check_sampling_flags(length, temperature, top_k, top_p)
    if not contexts or not all(len(c) for c in contexts):
        raise GPT2Error("a context is empty: give at least one token (GPT-2 starts unconditional text "
                        "with <|endoftext|>)")
    longest = max(len(c) for c in contexts)
    if longest + length - 1 > hparams.n_ctx:
        raise GPT2Error(f"{longest} context tokens and {length} new ones do not fit in {hparams.n_ctx}")
    # Rows share the cache of what their prompts start with. A lone row would read as many bytes
    # either way, and the split attention's extra steps cost it about 5% of its speed.
    n_shared = shared_prefix_length(contexts) if len(contexts) > 1 else 0
    rests = [c[n_shared:] for c in contexts]
    longest_rest = max(len(r) for r in rests)
    shared_len = bucket(n_shared, hparams.n_ctx) if n_shared else 0
    cache_len = bucket(longest_rest + length - 1, hparams.n_ctx - n_shared)
    context = np.zeros([len(contexts), longest_rest], np.int32)
    for row, tokens in zip(context, rests):
        row[:len(tokens)] = tokens
    rule = Rule(greedy=temperature == 0, top_k=min(top_k, hparams.n_vocab), use_top_p=top_p < 1,
                stop_token=stop_token)
    row_seeds = [[seed, first_sample + row] for row in range(len(contexts))]
    knobs = dict(row_seeds=tf.constant(row_seeds, tf.int64),
                 temperature=tf.constant(max(temperature, 1e-9), tf.float32), top_p=tf.constant(top_p, tf.float32))
    shared, state = _start(params, tf.constant(contexts[0][:n_shared], tf.int32), tf.constant(context),
                           tf.constant([len(r) for r in rests], tf.int32), hparams=hparams, rule=rule,
                           shared_len=shared_len, cache_len=cache_len, **knobs)
    yield state[1].numpy()[:, None]
    made, done = 1, state[3].numpy().all()
    while made < length and not done:
        n = length - made if chunk_size is None else min(chunk_size, length - made)
        state, out, steps = _advance(params, shared, state, tf.constant(made), tf.constant(n), hparams=hparams,
                                     rule=rule, **knobs)
        steps = int(steps)
        made += steps
        done = state[3].numpy().all()
        yield out.numpy()[:, :steps]


def sample(params, hparams, context, length, *, batch_size=1, temperature=1.0, top_k=0, top_p=1.0, seed=0,
           first_sample=0, stop_token=None):
    """`batch_size` continuations of the token list `context`, each a list of at most `length` tokens.

    A row ends before `stop_token` (which is not returned) when it is given. Rows are samples
    first_sample, first_sample + 1, ... of `seed` (see `sample_chunks`). `context` must fit
    (see `fit_context`).
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
