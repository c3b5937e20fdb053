"""gpt2.sampling's token rules in NumPy, for the int8 engine (gpt2.int8), which runs outside TensorFlow.

The rules are gpt2.sampling's: greedy argmax; otherwise logits / temperature, cut to the top_k
most likely tokens and to the top_p nucleus, then the Gumbel-max draw with the same SplitMix64
noise of (seed, sample number, step, token). The tests hold the two to the same tokens on rows
made to be hard (ties, -inf, huge and tiny logits). They can differ only at the last bit: the
nucleus's sums are float64 here and float32 there (a token whose likelier tokens carry within
about 1e-6 of top_p may fall on either side), and NumPy's float32 log is not XLA's (two tokens
whose noisy scores are within an ulp may swap).

Why a second form of them: between two steps of TensorFlow Lite programs, which stream every
weight through the processor's caches, a call into TensorFlow is slow, even an eager argmax; these
NumPy rules take less of a step (the timings are in docs/performance.md).
"""
import numpy as np

from .engine import MIN_TEMPERATURE, NO_TOKEN

_U64 = np.uint64


def _mix64(z):
    """The SplitMix64 finalizer, as gpt2.sampling's, on uint64 arrays (they wrap, as uint64 does)."""
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def uniform_noise(row_seed, step, n, tokens):
    """gpt2.sampling.uniform_noise of one row: the numbers in (0, 1) [len(tokens)] float32 of `tokens`
    at generation step `step` for the row's (seed, sample number) `row_seed`, n being n_vocab."""
    seed = np.asarray(row_seed, np.int64).astype(_U64)[:, None]  # [2, 1]: arrays, since scalars warn as they wrap
    key = _mix64(_mix64(seed[0]) ^ seed[1])
    counter = _U64(step) * _U64(n) + tokens.astype(_U64) + _U64(1)
    bits = _mix64(key + counter * _U64(0x9E3779B97F4A7C15))
    return ((bits >> _U64(41)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0 ** -23)


LANE = 64  # numbers per lane of kth_largest


def kth_largest(row, k):
    """The k-th largest number of row [n] (equal numbers counted apart), as np.partition(row, -k)[-k].

    It is among the numbers of the k lanes (of LANE numbers) with the largest maxima and the last,
    short lane: those k lanes hold k numbers at least as large as their least maximum, and with the
    short lane every number above it. (np.partition of GPT-2's 50257 logits took 260 us, about a
    thirtieth of an int8 step; the lanes' maxima and the few lanes' partitions, 49 us:
    docs/performance.md.)
    """
    whole = len(row) // LANE * LANE  # the numbers after the last whole lane are always among them
    if k * LANE > whole:
        return np.partition(row, -k)[-k]
    lanes = row[:whole].reshape(LANE, -1)  # a lane is a column: NumPy takes the maxima of rows of columns at once
    maxima = lanes.max(axis=0)
    candidates = np.concatenate([lanes[:, maxima >= np.partition(maxima, -k)[-k]].ravel(), row[whole:]])
    return np.partition(candidates, -k)[-k]


SUM_BLOCK = 256  # numbers per block of nucleus_threshold's running sums


def nucleus_threshold(logits, p):
    """The least logit that top_p keeps of a row of logits [n] (some may be -inf): the largest t such
    that the tokens of logit >= t carry p or more of the probability.

    The sums are float64. (gpt2.sampling's are float32: a token whose likelier tokens carry within
    about 1e-6 of p may fall on the other side there.)
    """
    descending = np.sort(logits)[::-1]
    if descending[0] == np.inf:  # (a tiny temperature) the infinite logits carry all the probability
        return descending[0]
    # The softmax's numerators, in blocks of SUM_BLOCK (the last one filled up with zeros): np.cumsum
    # adds one number at a time, which is slow, so the running sums go block by block.
    weights = np.zeros(-(-len(descending) // SUM_BLOCK) * SUM_BLOCK, np.float32)
    weights[:len(descending)] = np.exp(descending - descending[0])
    weights = weights.reshape(-1, SUM_BLOCK)
    block_ends = np.cumsum(weights.sum(axis=1, dtype=np.float64))
    target = np.float32(p) * block_ends[-1]  # p as a float32, as in choose
    block = np.searchsorted(block_ends, target)  # the first block whose running sum reaches the target
    before = block_ends[block - 1] if block else 0.0
    within = np.searchsorted(before + np.cumsum(weights[block], dtype=np.float64), target)
    # (Summed in another order, the block's sum may differ from its running sum's end by about 1e-16.)
    return descending[min(block * SUM_BLOCK + min(within, SUM_BLOCK - 1), len(descending) - 1)]


def choose(logits, steps, row_seeds, temperature, top_k, top_p, min_p=0.0):
    """Tokens [batch] int32 picked from logits [batch, n_vocab] by gpt2.sampling.choose's rules: row b
    at generation step steps[b] with its (seed, sample number) row_seeds[b] and its flags
    temperature[b] (0: greedy), top_k[b] (0: all tokens), top_p[b] (1: all tokens) and min_p[b] (0:
    all tokens); each of steps and the flags may also be one number for all rows."""
    batch, n_vocab = logits.shape
    steps, temperature, top_k, top_p, min_p = (np.broadcast_to(x, [batch])
                                               for x in (steps, temperature, top_k, top_p, min_p))
    tokens = np.argmax(logits, axis=-1).astype(np.int32)
    for b in np.flatnonzero(temperature > 0):
        with np.errstate(over="ignore"):  # a tiny temperature makes large logits +-inf, as in the compiled rule
            row = np.asarray(logits[b], np.float32) / np.float32(max(temperature[b], MIN_TEMPERATURE))
        kept = np.ones(n_vocab, bool)
        if 0 < top_k[b] < n_vocab:
            kept = row >= kth_largest(row, top_k[b])  # ties with the k-th largest are kept
        if top_p[b] < 1:
            kept &= row >= nucleus_threshold(np.where(kept, row, np.float32(-np.inf)), top_p[b])
        if min_p[b] > 0:  # as gpt2.sampling.min_p_filter, in float32
            kept &= row - row[kept].max() >= np.log(np.float32(min_p[b]))
        candidates = np.flatnonzero(kept)  # in token order: the first of equal scores wins, as in choose
        scores = row[candidates] - np.log(-np.log(uniform_noise(row_seeds[b], steps[b], n_vocab, candidates)))
        tokens[b] = candidates[np.argmax(scores)]
    return tokens


def adjust(logits, history, text_len, prompt_len, bias_tokens, bias_values, bad_words, no_repeat_ngram_size,
           repetition_penalty, repeat_last_n, presence_penalty, frequency_penalty):
    """gpt2.sampling.adjust's rules on logits [batch, n_vocab] (a new array), one row at a time; the
    arguments are gpt2.engine.Adjustments' fields, as arrays."""
    logits = np.array(logits, np.float32)
    for b, row in enumerate(logits):
        words = [[int(t) for t in word if t != NO_TOKEN] for word in bad_words[b]]
        n = no_repeat_ngram_size[b]
        if not ((bias_tokens[b] != NO_TOKEN).any() or any(words) or n or repetition_penalty[b] != 1
                or presence_penalty[b] or frequency_penalty[b]):
            continue  # nothing to do: the text is not even read
        text = history[b, :text_len[b]].tolist()
        for token, bias in zip(bias_tokens[b], bias_values[b]):
            if token != NO_TOKEN:
                row[token] += bias
        for word in words:
            if word and (len(word) == 1 or text[len(text) - len(word) + 1:] == word[:-1]):
                row[word[-1]] = -np.inf
        if n:
            last = text[len(text) - n + 1:] if n > 1 else []
            for i in range(len(text) - n + 1):
                if text[i:i + n - 1] == last:
                    row[text[i + n - 1]] = -np.inf
        if repetition_penalty[b] != 1:
            window = text[len(text) - repeat_last_n[b]:] if 0 < repeat_last_n[b] < len(text) else text
            seen = np.unique(np.array(window, np.int64))
            penalty = np.float32(repetition_penalty[b])
            row[seen] = np.where(row[seen] < 0, row[seen] * penalty, row[seen] / penalty)
        if presence_penalty[b] or frequency_penalty[b]:
            counts = np.bincount(np.array(text[prompt_len[b]:], np.int64), minlength=len(row)).astype(np.float32)
            row[:] = row - np.float32(presence_penalty[b]) * (counts > 0) - np.float32(frequency_penalty[b]) * counts
    return logits


def top_logprobs(logits, n):
    """gpt2.sampling.top_logprobs in NumPy: (the log-probabilities [batch, n] of each row's n most
    likely tokens, those tokens [batch, n], the whole rows' log-probabilities [batch, n_vocab])."""
    logits = np.asarray(logits, np.float32)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)
    tokens = np.argsort(-logprobs, axis=-1, kind="stable")[:, :n].astype(np.int32)
    return np.take_along_axis(logprobs, tokens, axis=-1), tokens, logprobs
