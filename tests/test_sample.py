"""The sampler: its filters against NumPy, its loop against step-by-step recomputation, its seeds."""
import numpy as np
import pytest
import tensorflow as tf

from gpt2.errors import GPT2Error
from gpt2.sample import (bucket, fit_context, sample, sample_chunks, shared_prefix_length, top_k_filter, top_p_filter,
                         uniform_noise)

PROMPT = [10, 200, 33, 5, 400, 17]


def test_greedy_follows_argmax_of_recomputed_logits(model, full_logits):
    hparams, params = model
    [row] = sample(params, hparams, PROMPT, 12, temperature=0)
    tokens = list(PROMPT)
    for token in row:
        assert token == int(np.argmax(full_logits(tokens)[-1]))
        tokens.append(token)
    assert len(row) == 12


def test_top_k_1_equals_greedy(model):
    hparams, params = model
    greedy = sample(params, hparams, PROMPT, 20, temperature=0)
    assert sample(params, hparams, PROMPT, 20, top_k=1, seed=5) == greedy
    assert sample(params, hparams, PROMPT, 20, top_k=1, temperature=3, seed=6) == greedy


def test_temperature_zero_ignores_the_seed(model):
    hparams, params = model
    runs = [sample(params, hparams, PROMPT, 15, temperature=0, seed=s, batch_size=2) for s in (1, 2)]
    assert runs[0] == runs[1] and runs[0][0] == runs[0][1]


def test_same_seed_same_samples_different_seed_differs(model):
    hparams, params = model
    first = sample(params, hparams, PROMPT, 30, batch_size=3, seed=42)
    assert sample(params, hparams, PROMPT, 30, batch_size=3, seed=42) == first
    assert sample(params, hparams, PROMPT, 30, batch_size=3, seed=43) != first
    assert len({tuple(row) for row in first}) == 3  # the rows of a batch are different draws
    # Sample n of a seed is the same draw in any batch: here samples 1 and 2, alone and together.
    assert sample(params, hparams, PROMPT, 30, seed=42, first_sample=1) == first[1:2]
    assert sample(params, hparams, PROMPT, 30, batch_size=2, seed=42, first_sample=1) == first[1:]


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.5, 5, 1.0), (1.0, 0, 0.6)])
def test_first_token_frequencies_follow_the_distribution(model, full_logits, temperature, top_k, top_p):
    """4000 draws of one token against the probabilities computed here in NumPy."""
    hparams, params = model
    probs = softmax(full_logits(PROMPT)[-1].astype(np.float64) / temperature)
    order = np.argsort(-probs)
    if top_k:
        probs[order[top_k:]] = 0
    if top_p < 1:
        before = np.cumsum(probs[order]) - probs[order]
        probs[order[before >= top_p]] = 0
    probs /= probs.sum()
    rows = sample(params, hparams, PROMPT, 1, batch_size=4000, temperature=temperature, top_k=top_k,
                  top_p=top_p, seed=9)
    counts = np.bincount([row[0] for row in rows], minlength=hparams.n_vocab)
    assert counts[probs == 0].sum() == 0  # nothing outside top_k / the nucleus
    likely = probs > 0.02
    observed = counts[likely] / 4000
    # 5 standard errors of a binomial proportion: fails on a wrong distribution, not by chance.
    assert np.all(np.abs(observed - probs[likely]) < 5 * np.sqrt(probs[likely] * (1 - probs[likely]) / 4000))


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


def test_stops_before_the_stop_token(model):
    hparams, params = model
    [greedy] = sample(params, hparams, PROMPT, 20, temperature=0)
    stop = greedy[4]
    cut = greedy.index(stop)
    assert sample(params, hparams, PROMPT, 20, temperature=0, stop_token=stop) == [greedy[:cut]]


def test_rows_stop_independently(model):
    hparams, params = model
    rows = sample(params, hparams, PROMPT, 40, batch_size=6, seed=1)
    stop = rows[0][3]  # a token that ends row 0 early; other rows end where they draw it, if at all
    stopped = sample(params, hparams, PROMPT, 40, batch_size=6, seed=1, stop_token=stop)
    for row, row_stopped in zip(rows, stopped):
        assert row_stopped == (row[:row.index(stop)] if stop in row else row)


def test_fills_the_whole_context(model):
    hparams, params = model
    [row] = sample(params, hparams, [1], hparams.n_ctx, seed=0)
    assert len(row) == hparams.n_ctx


def test_cache_sizes_are_few_and_never_a_third_empty():
    sizes = [bucket(n, 1024) for n in (1, 16, 17, 25, 33, 600, 767, 769, 2000)]
    assert sizes == [16, 16, 24, 32, 48, 768, 768, 1024, 1024]
    assert all(n <= bucket(n, 4096) <= max(16, n * 1.5) for n in range(1, 4097))


def test_fit_context():
    assert fit_context(list(range(10)), 119, 128) == list(range(10))
    assert fit_context(list(range(10)), 125, 128, truncate=True) == list(range(6, 10))
    with pytest.raises(GPT2Error, match="prompt is 10 tokens, which leaves room for 119 new tokens.*--truncate_prompt"):
        fit_context(list(range(10)), 120, 128)
    with pytest.raises(GPT2Error, match="more than the model's context"):
        fit_context([1], 129, 128, truncate=True)


@pytest.mark.parametrize("flags,message", [
    ({"temperature": -1}, "--temperature"), ({"top_k": -2}, "--top_k"), ({"top_p": 0}, "--top_p"),
    ({"top_p": 1.5}, "--top_p"), ({"length": 0}, "--length"), ({"temperature": float("nan")}, "--temperature"),
])
def test_impossible_flags(model, flags, message):
    hparams, params = model
    with pytest.raises(GPT2Error, match=message):
        sample(params, hparams, PROMPT, **{"length": 5, **flags})


def test_prompts_of_different_lengths_share_a_batch(model):
    hparams, params = model
    prompts = [PROMPT, PROMPT[:2], PROMPT + [7, 8, 9, 10, 11]]
    together = np.concatenate(list(sample_chunks(params, hparams, prompts, 10, temperature=0)), axis=1)
    for prompt, row in zip(prompts, together.tolist()):
        assert sample(params, hparams, prompt, 10, temperature=0) == [row]


def test_rows_share_the_tokens_their_prompts_start_with_but_the_last():
    assert shared_prefix_length([[1, 2, 3, 4]] * 3) == 3  # each row runs its last token itself
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 4, 6]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2]]) == 1
    assert shared_prefix_length([[1, 2], [3, 2]]) == 0
    assert shared_prefix_length([[7]]) == 0


def test_prompts_with_nothing_in_common_share_a_batch(model):
    hparams, params = model
    prompts = [PROMPT, [11] + PROMPT[1:], [3, 4]]
    together = np.concatenate(list(sample_chunks(params, hparams, prompts, 10, temperature=0)), axis=1)
    for prompt, row in zip(prompts, together.tolist()):
        assert sample(params, hparams, prompt, 10, temperature=0) == [row]


def test_chunks_give_the_same_tokens_as_one_pass(model):
    hparams, params = model
    whole = list(sample_chunks(params, hparams, [PROMPT] * 2, 25, seed=11))
    assert [chunk.shape[1] for chunk in whole] == [1, 24]
    pieces = list(sample_chunks(params, hparams, [PROMPT] * 2, 25, seed=11, chunk_size=4))
    assert [chunk.shape[1] for chunk in pieces] == [1] + [4] * 6
    np.testing.assert_array_equal(np.concatenate(pieces, axis=1), np.concatenate(whole, axis=1))


class CtrlCWhenHashed:
    """A value whose hash raises KeyboardInterrupt: as if Ctrl-C landed while TensorFlow hashed it."""
    __slots__ = ()  # no weak references, so tf.function hashes it to read its type

    def __hash__(self):
        raise KeyboardInterrupt


def test_ctrl_c_while_tensorflow_reads_the_arguments_stays_a_keyboard_interrupt(model):
    hparams, params = model
    with pytest.raises(TypeError, match="TraceType"):  # what TensorFlow makes of it on its own
        tf.function(lambda x: x)(CtrlCWhenHashed())
    with pytest.raises(KeyboardInterrupt):
        sample(params, hparams, PROMPT, 5, stop_token=CtrlCWhenHashed())


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
