"""The token rules without the model: filters against NumPy, the noise against SplitMix64 in plain Python."""
import numpy as np
import tensorflow as tf

from gpt2.sampling import top_k_filter, top_p_filter, uniform_noise


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
