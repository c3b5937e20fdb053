"""The token rules in NumPy draw the tokens that gpt2.sampling's compiled rules draw."""
import numpy as np
import pytest
import tensorflow as tf

from gpt2 import numpy_sampling, sampling
from test_sampling import exact_nucleus, hard_rows


def rows_of_normal_numbers():
    """The hard rows but the subnormal one. TensorFlow flushes subnormal numbers to zero, so it sees
    that row as all ties, and so do its probabilities, all equal; NumPy does not. Logits are never that small."""
    return np.array([row for row in hard_rows() if np.abs(row).max() > 1e-30])


def test_noise_is_gpt2_samplings():
    row_seeds = [[7, 0], [7, 1], [2 ** 40 + 3, 5], [2 ** 63 - 1, 2 ** 62]]
    tokens = np.array([0, 1, 7, 4000, 50255, 50256], np.int32)
    for step in (0, 3, 1023):
        want = sampling.uniform_noise(tf.constant(row_seeds, tf.int64), tf.constant(step), 50257,
                                      tf.constant(tokens[None])).numpy()
        got = [numpy_sampling.uniform_noise(row_seed, step, 50257, tokens) for row_seed in row_seeds]
        np.testing.assert_array_equal(got, want)


def test_the_nucleus_is_that_of_float64_sums():
    rows = rows_of_normal_numbers()
    for p in (0.1, 0.5, 0.9, 0.99):
        kept = np.array([row >= numpy_sampling.nucleus_threshold(row, p) for row in rows])
        probs = np.array([np.exp(row - row.max()) / np.exp(row - row.max()).sum() for row in rows.astype(np.float64)])
        np.testing.assert_array_equal(kept, exact_nucleus(probs, p), err_msg=f"top_p {p}")


@pytest.mark.parametrize("temperature,top_k,top_p", [(0, 0, 1.0), (1.0, 0, 1.0), (1.0, 40, 1.0), (0.7, 40, 1.0),
                                                     (1.0, 1000, 1.0), (1.0, 0, 0.9), (0.7, 0, 0.5), (1.0, 40, 0.9)])
def test_choose_draws_the_tokens_of_the_compiled_rule(temperature, top_k, top_p):
    rows = rows_of_normal_numbers()
    row_seeds = np.array([[42, sample] for sample in range(len(rows))], np.int64)
    rule = sampling.Rule(greedy=temperature == 0, top_k=top_k, use_top_p=top_p < 1, stop_token=None)
    compiled_choose = tf.function(sampling.choose, jit_compile=True)
    for step in (0, 7):
        want = compiled_choose(tf.constant(rows), step, tf.constant(row_seeds), tf.constant(max(temperature, 1e-9)),
                               tf.constant(top_p), rule).numpy()
        got = numpy_sampling.choose(rows, step, row_seeds, temperature, top_k, top_p)
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.int32


def test_a_stopped_row_repeats_the_stop_token():
    token, done = numpy_sampling.mark_stopped(np.array([5, 9, 2], np.int32), np.array([False, False, True]), 9)
    assert token.tolist() == [5, 9, 9] and done.tolist() == [False, True, True]
    token, done = numpy_sampling.mark_stopped(np.array([5, 9], np.int32), np.array([False, False]), None)
    assert token.tolist() == [5, 9] and done.tolist() == [False, False]
