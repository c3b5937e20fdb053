"""How each token is chosen from the model's logits: the token rules, each testable without the model.

The rules apply in this order (`adjust`, then `choose`), each row with its own flags:
    logits -> logit_bias and banned tokens (bad words, repeated n-grams) -> repetition, presence
    and frequency penalties -> [temperature 0: the most likely token] -> temperature -> top_k ->
    top_p -> min_p -> a draw
The draw takes noise from a counter-based random stream keyed by (seed, sample number, step), so
that the same seed and flags give the same samples, run after run, whatever the batch size or
the chunks. The log-probabilities a caller may ask for (`top_logprobs`) are the model's own,
before any rule. gpt2.decode runs these rules inside its compiled loop, so
none of them sorts the row of n_vocab logits: XLA does that slowly on the CPU.
"""
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from .engine import MIN_TEMPERATURE, NO_TOKEN
from .tensorflow_start import Compiled


def top_k_filter(logits, k):
    """Logits [batch, n_vocab] with all but the k largest of each row set to -inf (ties with the k-th
    kept); k is one number for all rows or one per row [batch], 0 keeping every token."""
    k = tf.broadcast_to(k, tf.shape(logits)[:1])

    def kth_largest(candidates):  # [batch]
        return largest_threshold(candidates, lambda above: tf.reduce_sum(tf.cast(above, tf.int32), axis=[1, 2]) >= k)

    # The k-th largest logit is also the k-th largest in the FEW_LANES lanes with the largest maxima
    # when k <= FEW_LANES: they hold FEW_LANES numbers >= the FEW_LANES-th largest maximum m, and
    # every number above m.
    threshold = tf.cond(tf.reduce_all(k <= FEW_LANES), lambda: kth_largest(top_lanes(logits, FEW_LANES).logits),
                        lambda: kth_largest(in_lanes(logits, -np.inf)))
    threshold = tf.where(k > 0, threshold, -np.inf)
    return tf.where(logits < threshold[:, None], tf.constant(-np.inf, logits.dtype), logits)


def top_p_filter(logits, p):
    """Logits [batch, columns] (a row's tokens, or some of them) cut to the nucleus of Holtzman et al. (2019),
    p being one number for all rows or one per row [batch].

    The nucleus is the smallest set of most likely tokens whose probabilities add up to at least p:
    it includes the token whose probability crosses p. (OpenAI's original code stopped just
    before that token.) Tokens tied with the least likely one kept are kept too. So the least
    likely token kept is the largest logit t such that the tokens of logit >= t carry p or more.
    The sums are float32: a token whose likelier tokens carry within about 1e-6 of p may fall on
    either side. (The sorted row's cumulative sums, used before, drifted by up to 1.4e-5.)
    """
    values = in_lanes(logits, -np.inf)  # [batch, rows, LANES]
    probs = in_lanes(tf.nn.softmax(logits), 0.0)
    least_kept = largest_threshold(
        values, lambda above: tf.reduce_sum(tf.where(above, probs, 0.0), axis=[1, 2]) >= p)  # [batch]
    return tf.where(logits < least_kept[:, None], tf.constant(-np.inf, logits.dtype), logits)


# Numbers per row of `in_lanes`. Sums down the rows first, then along the last one, took half the
# time of sums along the whole n_vocab in XLA on the CPU (top_p at batch 1; the same at batch 8).
# For top_k, n_vocab / LANES numbers a lane (25 of GPT-2's 50257) leave few to search.
LANES = 2048
# A top_k of at most this many tokens is found, and drawn from, in the FEW_LANES lanes with the
# largest maxima (1600 of GPT-2's 50257 tokens); a larger one in the whole row.
FEW_LANES = 64


def in_lanes(x, fill):
    """x [batch, n] as [batch, ceil(n / LANES), LANES], its last row filled up with `fill`."""
    n = x.shape[1]
    rows = -(-n // LANES)
    return tf.reshape(tf.pad(x, [[0, 0], [0, rows * LANES - n]], constant_values=fill), [-1, rows, LANES])


class Lanes(NamedTuple):
    """Some lanes of `in_lanes`: their logits and tokens [batch, rows, lanes]."""
    logits: tf.Tensor
    tokens: tf.Tensor
    complete: tf.Tensor  # whether they hold every logit above -inf of every row


def top_lanes(logits, n):
    """The n lanes of logits [batch, n_vocab] with the largest maxima, found by sorting LANES maxima."""
    values = in_lanes(logits, -np.inf)  # [batch, rows, LANES]: token r * LANES + l at [:, r, l]
    lane_max = tf.reduce_max(values, axis=1)  # [batch, LANES]
    lanes = tf.math.top_k(lane_max, n).indices  # [batch, n]
    return Lanes(logits=tf.gather(values, lanes, axis=2, batch_dims=1),
                 tokens=tf.range(values.shape[1])[:, None] * LANES + lanes[:, None, :],
                 complete=tf.reduce_all(tf.reduce_sum(tf.cast(lane_max > -np.inf, tf.int32), axis=-1) <= n))


def largest_threshold(values, reaches):
    """Per row of values [batch, ...] (float32), the largest t for which reaches(values >= t) holds: [batch].

    `reaches` must hold for t = -inf, and for any t below one where it holds; the answer is then
    one of the row's values (or -inf). Found by bisection over the float32 numbers in their order
    (see `ordered_bits`) instead of sorting the row, which XLA does slowly on the CPU: each halving
    of the 2^32 bit patterns is one compare-and-sum pass over the values. The answer is in
    [low, high), which always holds one of the row's values at least; the halving stops when it
    holds just one value in every row (after about 17 halvings for 50257 logits, not 32).
    """
    batch = tf.shape(values)[0]
    value_rank = len(values.shape) - 1
    axes = list(range(1, value_rank + 1))

    def halve(low, high, n_low, n_high):  # n_low, n_high: how many values are >= low, >= high
        middle = (low + high) // 2
        above = values >= tf.reshape(float_of_ordered_bits(tf.cast(middle, tf.int32)), [batch] + [1] * value_rank)
        passes, n_middle = reaches(above), tf.reduce_sum(tf.cast(above, tf.int32), axis=axes)  # [batch] each
        return (tf.where(passes, middle, low), tf.where(passes, high, middle),
                tf.where(passes, n_middle, n_low), tf.where(passes, n_high, n_middle))

    # The answer's bit pattern is in [low, high): -inf passes, and nothing is above +inf.
    low = tf.fill([batch], tf.cast(ordered_bits(tf.constant(-np.inf, tf.float32)), tf.int64))
    high = tf.fill([batch], tf.cast(ordered_bits(tf.constant(np.inf, tf.float32)), tf.int64) + 1)
    n_all = tf.fill([batch], int(np.prod(values.shape[1:])))
    # A loop, not 32 copies of its body: a quarter of the decoding step's graph less to build and compile.
    low, *_ = tf.while_loop(lambda low, high, n_low, n_high: tf.reduce_any(n_low - n_high > 1), halve,
                            (low, high, n_all, tf.zeros_like(n_all)), maximum_iterations=32)
    # The least value >= low: the one value in [low, high), or, after 32 halvings, low itself.
    low_value = tf.reshape(float_of_ordered_bits(tf.cast(low, tf.int32)), [batch] + [1] * value_rank)
    return tf.reduce_min(tf.where(values >= low_value, values, np.inf), axis=axes)


def ordered_bits(x):
    """The int32 bit patterns of float32 x, with negative numbers' magnitude bits flipped, so that
    they are in the order of the numbers: -inf < ... < -0.0 < +0.0 < ... < +inf (NaNs outside)."""
    bits = tf.bitcast(x, tf.int32)
    return tf.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def float_of_ordered_bits(bits):
    """The float32 numbers whose `ordered_bits` are `bits`: the flip undoes itself."""
    return tf.bitcast(tf.where(bits < 0, bits ^ 0x7FFFFFFF, bits), tf.float32)


def min_p_filter(logits, min_p):
    """Logits [batch, columns] without the tokens whose probability is under min_p [batch] times the
    row's most likely token's: those whose logit is below the largest by more than -log(min_p)."""
    kept = logits - tf.reduce_max(logits, axis=-1, keepdims=True) >= tf.math.log(min_p)[:, None]
    return tf.where(kept, logits, tf.constant(-np.inf, logits.dtype))




def adjust(logits, a):
    """Logits [batch, n_vocab] with each row's logit_bias added, its banned tokens at -inf, then its
    repetition, presence and frequency penalties. A rule that no row uses does no work (tf.cond);
    a row that does not use one is left as it is by it (a penalty of 1 or 0 changes no number)."""
    n_vocab = logits.shape[1]
    logits = tf.cond(tf.reduce_any(a.bias_tokens != NO_TOKEN),
                     lambda: add_logit_bias(logits, a.bias_tokens, a.bias_values), lambda: logits)
    logits = tf.cond(tf.reduce_any(a.bad_words != NO_TOKEN),
                     lambda: ban(logits, bad_word_bans(a.history, a.text_len, a.bad_words, n_vocab)), lambda: logits)
    logits = tf.cond(tf.reduce_any(a.no_repeat_ngram_size > 0),
                     lambda: ban(logits, repeated_ngram_bans(a.history, a.text_len, a.no_repeat_ngram_size, n_vocab)),
                     lambda: logits)
    window_start = tf.where(a.repeat_last_n > 0, tf.maximum(a.text_len - a.repeat_last_n, 0), 0)
    logits = tf.cond(tf.reduce_any(a.repetition_penalty != 1), lambda: penalize_repetition(
        logits, text_counts(a.history, window_start, a.text_len, n_vocab) > 0, a.repetition_penalty), lambda: logits)
    return tf.cond(tf.reduce_any((a.presence_penalty != 0) | (a.frequency_penalty != 0)), lambda: penalize_presence(
        logits, text_counts(a.history, a.prompt_len, a.text_len, n_vocab), a.presence_penalty, a.frequency_penalty),
        lambda: logits)


def add_logit_bias(logits, tokens, values):
    """Logits [batch, n_vocab] plus values [batch, B] at tokens [batch, B] (NO_TOKEN: nothing)."""
    rows = tf.broadcast_to(tf.range(tf.shape(tokens)[0])[:, None], tf.shape(tokens))
    index = tf.stack([rows, tf.maximum(tokens, 0)], axis=-1)
    return tf.tensor_scatter_nd_add(logits, tf.reshape(index, [-1, 2]),
                                    tf.reshape(tf.where(tokens != NO_TOKEN, values, 0.0), [-1]))


def ban(logits, banned):
    return tf.where(banned, tf.constant(-np.inf, logits.dtype), logits)


def text_counts(history, start, end, n_vocab):
    """How often each token occurs in history[b, start[b]:end[b]]: [batch, n_vocab] float32."""
    positions = tf.range(tf.shape(history)[1])[None]
    inside = (positions >= start[:, None]) & (positions < end[:, None])
    return tokens_at(history, tf.cast(inside, tf.float32), n_vocab)


def tokens_at(tokens, weights, n_vocab):
    """[batch, n_vocab] float32: the sums of weights [batch, n] over each row's tokens [batch, n]
    (a scatter: no [batch, n, n_vocab] one-hot)."""
    rows = tf.broadcast_to(tf.range(tf.shape(tokens)[0])[:, None], tf.shape(tokens))
    index = tf.stack([rows, tf.clip_by_value(tokens, 0, n_vocab - 1)], axis=-1)
    return tf.tensor_scatter_nd_add(tf.zeros([tf.shape(tokens)[0], n_vocab]), tf.reshape(index, [-1, 2]),
                                    tf.reshape(weights, [-1]))


def penalize_repetition(logits, seen, penalty):
    """The CTRL paper's rule, as Hugging Face applies it: the logit of each token `seen` [batch,
    n_vocab] is divided by the row's penalty [batch] where it is positive, multiplied where negative."""
    penalty = penalty[:, None]
    return tf.where(seen, tf.where(logits < 0, logits * penalty, logits / penalty), logits)


def penalize_presence(logits, counts, presence, frequency):
    """OpenAI's rule: logit - presence * (count > 0) - frequency * count, counts [batch, n_vocab]."""
    return logits - presence[:, None] * tf.cast(counts > 0, logits.dtype) - frequency[:, None] * counts


def repeated_ngram_bans(history, text_len, n, n_vocab):
    """[batch, n_vocab] bool: the tokens that would repeat an n[b]-gram of the row's text (Hugging
    Face's no_repeat_ngram_size): the token after each earlier place where the text's last n - 1
    tokens occur. n 0: none."""
    size = tf.shape(history)[1]
    starts = tf.range(size)[None]  # [1, H]: where an earlier n-gram starts
    # An n-gram that fits in the text before its end: starts i with i + n <= text_len.
    match = (starts + n[:, None] <= text_len[:, None]) & (n[:, None] > 0)

    def same_token(j, match):  # token j of each n-gram against token j of the text's last n - 1
        earlier = tf.gather(history, tf.minimum(starts[0] + j, size - 1), axis=1)
        last = tf.gather(history, tf.clip_by_value(text_len - n + 1 + j, 0, size - 1), batch_dims=1)
        return j + 1, match & ((j >= n - 1)[:, None] | (earlier == last[:, None]))

    _, match = tf.while_loop(lambda j, match: j < tf.reduce_max(n) - 1, same_token, (tf.constant(0), match))
    following = tf.gather(history, tf.minimum(starts[0] + tf.maximum(n - 1, 0)[:, None], size - 1), batch_dims=1)
    return tokens_at(following, tf.cast(match, tf.float32), n_vocab) > 0


def bad_word_bans(history, text_len, bad_words, n_vocab):
    """[batch, n_vocab] bool: the last token of each bad word [batch, W, L] whose other tokens the
    row's text ends with (a one-token word: always), as Hugging Face's bad_words_ids."""
    size, length = tf.shape(history)[1], bad_words.shape[2]
    word_len = tf.reduce_sum(tf.cast(bad_words != NO_TOKEN, tf.int32), axis=-1)  # [batch, W]
    last = tf.gather(bad_words, tf.maximum(word_len - 1, 0), batch_dims=2)  # [batch, W]
    j = tf.range(length - 1)[None, None]  # token j of a word's first word_len - 1 ...
    place = text_len[:, None, None] - (word_len[..., None] - 1) + j  # ... against this place of the text
    text = tf.gather(history, tf.reshape(tf.clip_by_value(place, 0, size - 1), [tf.shape(history)[0], -1]),
                     batch_dims=1)
    same = tf.reshape(text, tf.shape(place)) == bad_words[..., :length - 1]
    match = tf.reduce_all((j >= word_len[..., None] - 1) | ((place >= 0) & same), axis=-1) & (word_len > 0)
    return tokens_at(last, tf.cast(match, tf.float32), n_vocab) > 0


def top_logprobs(logits, n):
    """The log-probabilities [batch, n] of each row's n most likely tokens, most likely first, and
    those tokens [batch, n], from logits [batch, n_vocab]; and the whole row's [batch, n_vocab]."""
    logprobs = tf.nn.log_softmax(logits)
    lanes = top_lanes(logprobs, n)  # the n lanes with the largest maxima hold the n largest numbers
    columns = np.prod(lanes.logits.shape[1:])
    values, index = tf.math.top_k(tf.reshape(lanes.logits, [-1, columns]), n)
    tokens = tf.gather(tf.reshape(tf.broadcast_to(lanes.tokens, tf.shape(lanes.logits)), [-1, columns]), index,
                       batch_dims=1)
    return values, tokens, logprobs


class Draws(NamedTuple):
    """What each row's next token depends on, [batch] each: data that the compiled step reads, so
    that rows of other flags share one program."""
    row_seeds: tf.Tensor  # [batch, 2] int64: the row's (seed, sample number)
    step: tf.Tensor  # int32: tokens the row has made before this one
    temperature: tf.Tensor  # float32; 0: greedy (the most likely token)
    top_k: tf.Tensor  # int32; 0: no cut
    top_p: tf.Tensor  # float32; 1: no cut
    min_p: tf.Tensor  # float32; 0: no cut


def choose(next_logits, draws):
    """Tokens [batch] int32 picked from logits [batch, n_vocab] by each row's Draws.

    Each row draws with its own seed, by the Gumbel-max trick: the argmax of logits plus Gumbel
    noise is a draw from their softmax. So a sample's tokens depend on its seed, sample number and
    flags alone, not on which rows share its batch. The work that no row needs is skipped
    (tf.cond): a batch of greedy rows draws no noise, one without top_p sums no nucleus.
    """
    greedy = tf.argmax(next_logits, axis=-1, output_type=tf.int32)
    sampling = draws.temperature > 0
    n_vocab = next_logits.shape[1]
    all_tokens = tf.range(n_vocab)[None]

    def sample():
        top_k = tf.where(sampling, draws.top_k, 0)
        top_p = tf.where(sampling, draws.top_p, 1.0)
        min_p = tf.where(sampling, draws.min_p, 0.0)
        # A greedy row's draw is not used: its row keeps only its argmax, so that it leaves the lanes
        # of the other rows' top_k complete.
        logits = tf.where(sampling[:, None], next_logits / tf.maximum(draws.temperature, MIN_TEMPERATURE)[:, None],
                          tf.where(all_tokens == greedy[:, None], 0.0, -np.inf))
        logits = tf.cond(tf.reduce_any(top_k > 0), lambda: top_k_filter(logits, top_k), lambda: logits)

        def draw(logits, tokens):
            """The token drawn from logits [batch, m] of tokens [batch or 1, m], the row's others being -inf."""
            nucleus = top_p < 1
            logits = tf.cond(tf.reduce_any(nucleus),
                             lambda: tf.where(nucleus[:, None], top_p_filter(logits, top_p), logits), lambda: logits)
            logits = tf.cond(tf.reduce_any(min_p > 0), lambda: min_p_filter(logits, min_p), lambda: logits)
            scores = logits - tf.math.log(-tf.math.log(uniform_noise(draws.row_seeds, draws.step, n_vocab, tokens)))
            best = tf.reduce_max(scores, axis=-1, keepdims=True)
            return tf.reduce_min(tf.where(scores == best, tokens, n_vocab), axis=-1)  # the first, as tf.argmax's

        # The FEW_LANES lanes with the largest maxima hold all the tokens each row keeps, unless ties
        # with the k-th largest spread them over more lanes: then the whole row is drawn from. So
        # most steps of a top_k 40 make noise for 1600 of 50257 tokens.
        def few_lanes():
            lanes = top_lanes(logits, FEW_LANES)
            columns = np.prod(lanes.logits.shape[1:])
            return tf.cond(lanes.complete, lambda: draw(tf.reshape(lanes.logits, [-1, columns]),
                                                        tf.reshape(lanes.tokens, [-1, columns])),
                           lambda: draw(logits, all_tokens))

        few = tf.reduce_all(~sampling | ((top_k > 0) & (top_k <= FEW_LANES)))
        return tf.cond(few, few_lanes, lambda: draw(logits, all_tokens))

    return tf.where(sampling, tf.cond(tf.reduce_any(sampling), sample, lambda: greedy), greedy)


def _mix64(z):
    """The SplitMix64 finalizer: a bijection of uint64 whose outputs look independent of its inputs."""
    shift = lambda z, n: tf.bitwise.right_shift(z, tf.constant(n, tf.uint64))  # noqa: E731
    z = tf.bitwise.bitwise_xor(z, shift(z, 30)) * tf.constant(0xBF58476D1CE4E5B9, tf.uint64)
    z = tf.bitwise.bitwise_xor(z, shift(z, 27)) * tf.constant(0x94D049BB133111EB, tf.uint64)
    return tf.bitwise.bitwise_xor(z, shift(z, 31))


def uniform_noise(row_seeds, step, n, tokens=None):
    """Uniform numbers in (0, 1), [batch, columns]: row b's are draws step * n + token + 1 of the
    SplitMix64 stream keyed by row_seeds[b] = (seed, sample number), for the tokens [batch or 1,
    columns] (None: 0 ... n - 1); `step` is one number or one per row [batch]. Call it op by op or from an XLA-compiled function: TensorFlow's
    own kernels lack uint64 ops.

    A counter-based generator: every number is a function of (seed, sample, step, token) alone, so
    all rows and tokens are computed at once, with no state and no loop over rows, and a token's
    number does not depend on which others are drawn with it.
    """
    # In a compiled function (the decoding loop) it is part of its program: a tf.function called
    # there would be traced once more for each shape of `tokens`.
    return _uniform_noise(row_seeds, step, n, tokens) if tf.inside_function() else \
        compiled_uniform_noise(row_seeds, step, n, tokens)


def _uniform_noise(row_seeds, step, n, tokens):
    tokens = tf.range(n)[None] if tokens is None else tokens
    seeds = tf.cast(row_seeds, tf.uint64)
    key = _mix64(tf.bitwise.bitwise_xor(_mix64(seeds[:, 0]), seeds[:, 1]))  # [batch]
    step = tf.reshape(tf.cast(step, tf.uint64), [-1, 1])  # one step for all rows, or one per row
    counter = step * n + tf.cast(tf.cast(tokens, tf.int64) + 1, tf.uint64)  # [batch or 1, columns]
    bits = _mix64(key[:, None] + counter * tf.constant(0x9E3779B97F4A7C15, tf.uint64))
    # The top 23 bits, centred in their interval: exact in float32, never 0 or 1 (both would make log infinite).
    return (tf.cast(tf.bitwise.right_shift(bits, tf.constant(41, tf.uint64)), tf.float32) + 0.5) * 2.0 ** -23


# The noise op by op (the prompt's pass): compiled on its own.
compiled_uniform_noise = Compiled(_uniform_noise, jit_compile=True)
