"""Sampling text from GPT-2: one compiled TensorFlow loop from the prompt to the last new token.

Each step turns the last logits into a token: greedy argmax when temperature is 0, otherwise
logits / temperature, cut to the top_k most likely tokens and to the top_p nucleus, then a draw
from a stateless random generator keyed by (seed, stream, step), so that the same seed and flags
give the same tokens, run after run.
"""
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


@tf.function(reduce_retracing=True)
def _sample_loop(params, context, length, seed, temperature, top_p, *, hparams, top_k, use_top_p, greedy,
                 stop_token):
    """Tokens [batch, steps] that follow `context` [batch, n]; steps < length if every row stopped."""

    def choose(h, step):
        next_logits = logits(params, h[:, -1])
        if greedy:
            return tf.argmax(next_logits, axis=-1, output_type=tf.int32)
        next_logits = next_logits / temperature
        if top_k:
            next_logits = top_k_filter(next_logits, top_k)
        if use_top_p:
            next_logits = top_p_filter(next_logits, top_p)
        step_seed = tf.random.experimental.stateless_fold_in(seed, step)
        return tf.random.stateless_categorical(next_logits, 1, seed=step_seed, dtype=tf.int32)[:, 0]

    batch_size, n_context = tf.shape(context)[0], tf.shape(context)[1]
    # The last new token is never fed back, so the cache holds n_context + length - 1 positions.
    past = empty_cache(hparams, batch_size, n_context + length - 1)
    h, past = forward(params, hparams, context, past, 0)  # the whole prompt in one pass
    token = choose(h, 0)
    done = tf.equal(token, stop_token) if stop_token is not None else tf.zeros_like(token, tf.bool)
    tokens = tf.TensorArray(tf.int32, size=length).write(0, token)

    def keep_going(step, token, past, done, tokens):
        return (step < length) & ~tf.reduce_all(done)

    def next_token(step, token, past, done, tokens):
        h, past = forward(params, hparams, token[:, None], past, n_context + step - 1)
        token = choose(h, step)
        if stop_token is not None:
            token = tf.where(done, stop_token, token)  # finished rows only repeat the stop token
            done = done | tf.equal(token, stop_token)
        return step + 1, token, past, done, tokens.write(step, token)

    step, _, _, _, tokens = tf.while_loop(keep_going, next_token, (tf.constant(1), token, past, done, tokens))
    return tf.transpose(tokens.gather(tf.range(step)))


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


def sample(params, hparams, context, length, *, batch_size=1, temperature=1.0, top_k=0, top_p=1.0, seed=0,
           stream=0, stop_token=None):
    """`batch_size` continuations of the token list `context`, each a list of at most `length` tokens.

    A row ends before `stop_token` (which is not returned) when it is given. `seed` and `stream`
    (for example the batch number) pick the random draws: the same pair gives the same tokens.
    `context` must fit (see `fit_context`).
    """
    check_sampling_flags(length, temperature, top_k, top_p)
    if not context:
        raise GPT2Error("the context is empty: give at least one token (GPT-2 starts unconditional text "
                        "with <|endoftext|>)")
    if len(context) + length - 1 > hparams.n_ctx:
        raise GPT2Error(f"{len(context)} context tokens and {length} new ones do not fit in {hparams.n_ctx}")
    context = tf.constant([list(context)] * batch_size, dtype=tf.int32)
    out = _sample_loop(params, context, tf.constant(length), tf.constant([seed, stream], tf.int64),
                       tf.constant(max(temperature, 1e-9), tf.float32), tf.constant(top_p, tf.float32),
                       hparams=hparams, top_k=min(top_k, hparams.n_vocab), use_top_p=top_p < 1,
                       greedy=temperature == 0, stop_token=stop_token).numpy()
    rows = []
    for row in out.tolist():
        if stop_token is not None and stop_token in row:
            row = row[:row.index(stop_token)]
        rows.append(row)
    return rows
