"""The token rules without the model: filters against NumPy and sorting, the noise against SplitMix64 in Python."""
import numpy as np
import pytest
import tensorflow as tf

from gpt2.engine import NO_TOKEN, Adjustments
from gpt2.sampling import Draws, adjust, choose, min_p_filter, top_k_filter, top_logprobs, top_p_filter, uniform_noise


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_top_p_keeps_exactly_the_nucleus():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    cases = {0.3: {1}, 0.6: {1, 3}, 0.7: {1, 3}, 0.9: {1, 2, 3}, 0.97: {0, 1, 2, 3}}
    for p, nucleus in cases.items():
        kept = top_p_filter(tf.constant([np.log(probs)], tf.float32), p)[0].numpy()
        assert set(np.flatnonzero(np.isfinite(kept))) == nucleus, p


def test_top_p_matches_numpy_on_random_rows():
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((50, 300)) * 3
    for p in (0.1, 0.5, 0.9):
        kept = np.isfinite(top_p_filter(tf.constant(rows, tf.float32), p).numpy())
        for row, row_kept in zip(rows, kept):
            probs = softmax(row)
            order = np.argsort(-probs)
            n = np.searchsorted(np.cumsum(probs[order]), p) + 1  # smallest n with mass >= p
            assert set(np.flatnonzero(row_kept)) == set(order[:n])


def test_top_k_keeps_k():
    rows = tf.constant(np.random.default_rng(4).standard_normal((5, 100)), tf.float32)
    kept = np.isfinite(top_k_filter(rows, 7).numpy())
    assert (kept.sum(axis=1) == 7).all()
    for row_kept, row in zip(kept, rows.numpy()):
        assert set(np.flatnonzero(row_kept)) == set(np.argsort(-row)[:7])


def sorted_top_k_filter(logits, k):
    """top_k_filter as it was before 2026-11 (slow in XLA): the k-th largest logit from a sort."""
    kth_largest = tf.math.top_k(logits, k=k).values[:, -1:]
    return tf.where(logits < kth_largest, tf.constant(-np.inf, logits.dtype), logits)


def sorted_top_p_filter(logits, p):
    """top_p_filter as it was before 2026-11 (slow in XLA): the nucleus read off the sorted row."""
    sorted_logits = tf.sort(logits, direction="DESCENDING")
    mass_before = tf.cumsum(tf.nn.softmax(sorted_logits), axis=-1, exclusive=True)
    n_kept = tf.reduce_sum(tf.cast(mass_before < p, tf.int32), axis=-1)
    least_kept = tf.gather(sorted_logits, n_kept - 1, batch_dims=1)
    return tf.where(logits < least_kept[:, None], tf.constant(-np.inf, logits.dtype), logits)


def hard_rows(n_vocab=50257):
    """Rows of logits [n, n_vocab] float32 that a filter could get wrong: peaked and nearly flat
    ones (as random weights give), ties everywhere and at the cut, all equal, -0.0 beside +0.0,
    subnormal numbers, -inf (as top_k leaves), huge magnitudes, one token with all the mass."""
    rng = np.random.default_rng(5)
    rows = [rng.standard_normal(n_vocab) * scale for scale in (0.01, 0.3, 1, 3, 10) for _ in range(4)]
    rows += [np.round(rng.standard_normal(n_vocab) * 2) for _ in range(4)]  # a few values, each many times
    rows.append(np.full(n_vocab, 1.5))
    tied_at_cut = rng.standard_normal(n_vocab)
    tied_at_cut[rng.choice(n_vocab, 60, replace=False)] = np.sort(tied_at_cut)[-30]  # straddles the 40th
    rows.append(tied_at_cut)
    zeros = -np.abs(rng.standard_normal(n_vocab))
    zeros[:3000:2], zeros[1:3000:2] = -0.0, 0.0
    rows.append(zeros)
    rows.append(rng.standard_normal(n_vocab) * 1e-39)  # subnormal
    with_inf = rng.standard_normal(n_vocab)
    with_inf[rng.choice(n_vocab, n_vocab - 100, replace=False)] = -np.inf
    rows.append(with_inf)
    rows.append(rng.standard_normal(n_vocab) * 1e30)
    dominant = rng.standard_normal(n_vocab)
    dominant[7] = 40
    rows.append(dominant)
    return np.array(rows, np.float32)


@pytest.mark.parametrize("compiled", [False, True])
def test_top_k_keeps_what_sorting_kept(compiled):
    rows = tf.constant(hard_rows())
    for k in (1, 40, 1000, 50257):
        kept = (tf.function(top_k_filter, jit_compile=True) if compiled else top_k_filter)(rows, k)
        np.testing.assert_array_equal(kept.numpy(), sorted_top_k_filter(rows, k).numpy(), err_msg=f"top_k {k}")


def exact_nucleus(probs, p):
    """Which tokens the nucleus of float32 probabilities [n, n_vocab] keeps, from float64 sums (NumPy)."""
    kept = []
    for row in probs.astype(np.float64):
        descending = np.sort(row)[::-1]
        n_kept = np.sum(np.cumsum(descending) - descending < np.float32(p))
        kept.append(row >= descending[n_kept - 1])
    return np.array(kept)


def assert_same_but_near_p(kept, expected, probs, p, tolerance, most):
    """kept and expected [n, n_vocab] differ in at most `most` tokens a row, each with the likelier
    tokens' mass within `tolerance` of p: tokens that sums in float32 may put on either side."""
    for row, differ in zip(probs.astype(np.float64), kept != expected):
        assert differ.sum() <= most
        for token in np.flatnonzero(differ):
            assert abs(row[row > row[token]].sum() - p) < tolerance


@pytest.mark.parametrize("compiled", [False, True])
def test_top_p_keeps_the_nucleus_of_float64_sums(compiled):
    rows = tf.constant(hard_rows())
    probs = (tf.function(tf.nn.softmax, jit_compile=True) if compiled else tf.nn.softmax)(rows).numpy()
    for p in (0.1, 0.5, 0.9, 0.99):
        kept = np.isfinite((tf.function(top_p_filter, jit_compile=True) if compiled else top_p_filter)(
            rows, tf.constant(p)).numpy())
        assert_same_but_near_p(kept, exact_nucleus(probs, p), probs, p, tolerance=1e-6, most=1)


def test_top_p_differs_from_sorting_only_where_float32_sums_blurred_p():
    """The sorting filter summed the sorted probabilities one after another in float32: over tens of
    thousands of tokens the sum drifted (by up to 1.4e-5 on these rows), which moved its cut by a
    token or three. (Its TensorFlow and XLA versions disagreed there too.) Elsewhere the two agree."""
    rows = tf.constant(hard_rows())
    probs = tf.nn.softmax(rows).numpy()
    for p in (0.1, 0.5, 0.9, 0.99):
        kept = np.isfinite(top_p_filter(rows, tf.constant(p)).numpy())
        kept_by_sorting = np.isfinite(sorted_top_p_filter(rows, p).numpy())
        assert (kept == kept_by_sorting).all(axis=1).mean() > 0.8
        assert_same_but_near_p(kept, kept_by_sorting, probs, p, tolerance=1e-4, most=3)


@pytest.mark.parametrize("top_k,top_p", [(40, 1.0), (0, 0.9), (40, 0.9), (200, 1.0)])
def test_a_seed_draws_the_tokens_it_drew_with_sorting_filters(top_k, top_p):
    """choose, compiled as in the decoding loop, against the same draw through the sorting filters:
    all rows at once (ties spread some rows' top_k over many lanes) and each row alone."""
    rows = tf.constant(hard_rows())
    row_seeds = tf.constant([[42, sample] for sample in range(len(rows))], tf.int64)
    compiled_choose = tf.function(choose, jit_compile=True)

    def draws(n, step, temperature):
        return Draws(row_seeds[:n], tf.fill([n], step), tf.fill([n], temperature), tf.fill([n], top_k),
                     tf.fill([n], top_p), tf.zeros([n]))

    for step, temperature in ((0, 1.0), (7, 0.7)):
        expected = rows / temperature
        if top_k:
            expected = sorted_top_k_filter(expected, top_k)
        if top_p < 1:
            expected = sorted_top_p_filter(expected, top_p)
        gumbel = -np.log(-np.log(uniform_noise(row_seeds, tf.constant(step), rows.shape[1]).numpy()))
        expected_tokens = np.argmax(expected.numpy() + gumbel, axis=-1)
        tokens = compiled_choose(rows, draws(len(rows), step, temperature))
        np.testing.assert_array_equal(tokens.numpy(), expected_tokens)
        for i in range(len(rows)):
            alone = draws(len(rows), step, temperature)
            token = compiled_choose(rows[i:i + 1], Draws(*(t[i:i + 1] for t in alone)))
            assert token.numpy()[0] == expected_tokens[i], i


def test_rows_of_other_flags_draw_in_one_batch_what_each_draws_alone():
    """Each row's flags are its own: greedy, top_k, top_p, both, and plain rows share one compiled
    call and draw what each draws in a batch of rows of its flags alone."""
    rows = tf.constant(hard_rows()[:10])
    flags = [(0.0, 0, 1.0), (1.0, 40, 1.0), (0.7, 0, 0.9), (1.3, 40, 0.9), (1.0, 0, 1.0), (0.0, 40, 0.5),
             (1.0, 300, 1.0), (0.8, 1, 1.0), (1.0, 50257, 0.99), (2.0, 64, 1.0)]
    temperature, top_k, top_p = (tf.constant(column) for column in zip(*flags))
    row_seeds = tf.constant([[5, sample] for sample in range(len(flags))], tf.int64)
    steps = tf.range(len(flags)) * 3
    compiled_choose = tf.function(choose, jit_compile=True)
    together = compiled_choose(rows, Draws(row_seeds, steps, tf.cast(temperature, tf.float32), top_k,
                                           tf.cast(top_p, tf.float32), tf.zeros([len(flags)]))).numpy()
    for i, (t, k, p) in enumerate(flags):
        same = Draws(tf.repeat(row_seeds[i:i + 1], 2, axis=0), tf.repeat(steps[i:i + 1], 2), tf.fill([2], t),
                     tf.fill([2], k), tf.fill([2], p), tf.zeros([2]))
        alone = compiled_choose(tf.repeat(rows[i:i + 1], 2, axis=0), same).numpy()
        assert together[i] == alone[0] == alone[1], (i, flags[i])
    assert together[0] == np.argmax(rows[0]) and together[7] == np.argmax(rows[7])  # greedy, and top_k 1


def mix64(z):
    """SplitMix64's finalizer (Steele, Lea and Flood, 2014), in plain Python."""
    mask = (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def splitmix64(seed, count):
    """Numbers 1..count of the SplitMix64 stream of `seed`."""
    return [mix64((seed + i * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)) for i in range(1, count + 1)]


def test_noise_is_the_splitmix64_stream_of_each_rows_seed():
    """Row (seed, sample) at step t gets numbers t*n+1 .. t*n+n of the stream keyed by mix(mix(seed) ^ sample)."""
    row_seeds = [[7, 0], [7, 1], [2 ** 40 + 3, 5]]
    noise = uniform_noise(tf.constant(row_seeds, tf.int64), tf.constant(3), 50).numpy()
    for (seed, sample_number), row in zip(row_seeds, noise):
        stream = splitmix64(mix64(mix64(seed) ^ sample_number), 4 * 50)[3 * 50:]
        np.testing.assert_array_equal(row, [((z >> 41) + 0.5) / 2 ** 23 for z in stream])


def test_noise_of_some_tokens_is_theirs_in_the_whole_row():
    row_seeds = tf.constant([[3, 0], [3, 1]], tf.int64)
    whole = uniform_noise(row_seeds, tf.constant(5), 50257).numpy()
    tokens = np.array([[0, 7, 50256, 1000], [9, 7, 2, 40000]], np.int32)
    some = uniform_noise(row_seeds, tf.constant(5), 50257, tf.constant(tokens)).numpy()
    np.testing.assert_array_equal(some, np.take_along_axis(whole, tokens, axis=1))


def test_noise_is_uniform_and_independent_across_rows_and_steps():
    noise = np.stack([uniform_noise(tf.constant([[1, 0], [1, 1]], tf.int64), tf.constant(step), 50257).numpy()
                      for step in range(4)])  # [step, row, token]
    flat = noise.ravel()
    assert 0 < flat.min() and flat.max() < 1
    assert abs(flat.mean() - 0.5) < 0.002 and abs(flat.var() - 1 / 12) < 0.001
    counts = np.histogram(flat, bins=20, range=(0, 1))[0]
    chi2 = ((counts - flat.size / 20) ** 2 / (flat.size / 20)).sum()
    assert chi2 < 50  # 19 degrees of freedom: 50 is far beyond the 99.9th percentile (43.8)
    rows = noise.reshape(-1, 50257)
    assert np.abs(np.corrcoef(rows) - np.eye(len(rows))).max() < 0.03  # no two rows or steps alike


# The rules that adjust the logits before a token is chosen (issue 29), each against values written
# out by hand from its published statement.

def adjusted(logits, **per_row):
    """gpt2.sampling.adjust of one row's logits, with the Adjustments of `per_row` (others off)."""
    history = per_row.pop("history", [])
    fields = dict(history=[history + [0] * 4], text_len=[len(history)], prompt_len=[per_row.pop("prompt_len", 0)],
                  bias_tokens=[[NO_TOKEN]], bias_values=[[0.0]], bad_words=[[[NO_TOKEN]]], no_repeat_ngram_size=[0],
                  repetition_penalty=[1.0], repeat_last_n=[0], presence_penalty=[0.0], frequency_penalty=[0.0])
    fields.update({name: [value] for name, value in per_row.items()})
    dtypes = {name: tf.float32 for name in ("bias_values", "repetition_penalty", "presence_penalty",
                                            "frequency_penalty")}
    a = Adjustments(**{name: tf.constant(value, dtypes.get(name, tf.int32)) for name, value in fields.items()})
    return tf.function(adjust, jit_compile=True)(tf.constant([logits], tf.float32), a)[0].numpy()


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    """CTRL (Keskar et al. 2019) as Hugging Face's RepetitionPenaltyLogitsProcessor: score < 0 ? score * p : score / p,
    for each token in the prompt or the sample, once however often it occurs."""
    logits = [2.0, -1.0, 0.5, -3.0, 0.0, 4.0]
    got = adjusted(logits, history=[0, 1, 1, 4, 0], repetition_penalty=2.0)
    np.testing.assert_allclose(got, [1.0, -2.0, 0.5, -3.0, 0.0, 4.0])
    # repeat_last_n: only the text's last 2 tokens (4 and 0) count
    got = adjusted(logits, history=[1, 3, 4, 0], repetition_penalty=2.0, repeat_last_n=2)
    np.testing.assert_allclose(got, [1.0, -1.0, 0.5, -3.0, 0.0, 4.0])


def test_presence_and_frequency_penalties_count_the_samples_own_tokens():
    """OpenAI's rule: logit - presence * (count > 0) - frequency * count, over the tokens after the prompt."""
    logits = [1.0, 1.0, 1.0, 1.0]
    got = adjusted(logits, history=[3, 3, 0, 2, 2, 2], prompt_len=2, presence_penalty=0.5, frequency_penalty=0.25)
    np.testing.assert_allclose(got, [1.0 - 0.5 - 0.25, 1.0, 1.0 - 0.5 - 0.75, 1.0])  # token 3 is only in the prompt
    got = adjusted(logits, history=[1, 1], prompt_len=0, presence_penalty=-1.0, frequency_penalty=0.0)
    np.testing.assert_allclose(got, [1.0, 2.0, 1.0, 1.0])  # a negative penalty favours what was said


def test_no_repeat_ngram_bans_what_would_repeat_an_ngram():
    """Hugging Face's NoRepeatNGramLogitsProcessor: the tokens that followed each earlier occurrence
    of the text's last n - 1 tokens; n = 1 bans every token of the text."""
    logits = np.zeros(8)
    history = [1, 2, 3, 1, 2, 5, 1, 2]  # "1 2" was followed by 3 and by 5
    assert np.flatnonzero(np.isinf(adjusted(logits, history=history, no_repeat_ngram_size=3))).tolist() == [3, 5]
    # bigrams: the last token 2 was followed by 3 and 5 before
    assert np.flatnonzero(np.isinf(adjusted(logits, history=history, no_repeat_ngram_size=2))).tolist() == [3, 5]
    assert np.flatnonzero(np.isinf(adjusted(logits, history=history, no_repeat_ngram_size=1))).tolist() == [1, 2, 3, 5]
    assert not np.isinf(adjusted(logits, history=history, no_repeat_ngram_size=4)).any()  # "5 1 2" is new
    assert not np.isinf(adjusted(logits, history=[1, 2], no_repeat_ngram_size=3)).any()  # shorter than n


def test_bad_words_ban_their_last_token_after_the_rest_of_them():
    """Hugging Face's bad_words_ids: a one-token word is always banned; a longer one's last token
    where the text ends with its others."""
    logits = np.zeros(8)
    words = [[5, NO_TOKEN, NO_TOKEN], [2, 3, NO_TOKEN], [1, 2, 7]]
    assert np.flatnonzero(np.isinf(adjusted(logits, history=[4, 1, 2], bad_words=words))).tolist() == [3, 5, 7]
    assert np.flatnonzero(np.isinf(adjusted(logits, history=[4, 2], bad_words=words))).tolist() == [3, 5]
    assert np.flatnonzero(np.isinf(adjusted(logits, history=[2, 4], bad_words=words))).tolist() == [5]


def test_logit_bias_adds_to_its_tokens():
    got = adjusted([1.0, 2.0, 3.0], bias_tokens=[2, 0, NO_TOKEN], bias_values=[-100.0, 0.5, 9.0])
    np.testing.assert_allclose(got, [1.5, 2.0, -97.0])


def test_min_p_keeps_tokens_of_at_least_min_p_times_the_top_probability():
    """Probabilities 0.4, 0.2, 0.2, 0.1, 0.1 (from logs): min_p 0.5 keeps those of 0.2 and up (a tie
    at the cut is kept), 0.51 only the top one; 0.25 keeps all (a tie again)."""
    logits = tf.constant([np.log([0.1, 0.4, 0.2, 0.1, 0.2])], tf.float32)
    for min_p, kept in [(0.5, [1, 2, 4]), (0.51, [1]), (0.26, [1, 2, 4]), (0.25, [0, 1, 2, 3, 4])]:
        assert np.flatnonzero(np.isfinite(min_p_filter(logits, tf.constant([min_p]))[0])).tolist() == kept, min_p


def test_top_logprobs_are_the_log_softmax_s_largest_most_likely_first():
    rows = hard_rows()[:12]
    values, tokens, logprobs = tf.function(lambda x: top_logprobs(x, 20), jit_compile=True)(tf.constant(rows))
    want = rows.astype(np.float64) - np.log(np.exp(rows - rows.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - rows.max(-1, keepdims=True)
    for row, row_values, row_tokens in zip(want, values.numpy(), tokens.numpy()):
        np.testing.assert_allclose(row_values, np.sort(row)[::-1][:20], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(row[row_tokens], row_values, rtol=1e-5, atol=1e-5)
        assert (np.diff(row_values) <= 0).all() and len(set(row_tokens.tolist())) == 20
