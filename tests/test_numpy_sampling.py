"""The token rules in NumPy draw the tokens that gpt2.sampling's compiled rules draw."""
import warnings

import numpy as np
import pytest
import tensorflow as tf

from gpt2 import numpy_sampling, sampling
from gpt2.decode import row_seeds, sampling_settings
from gpt2.folders import HParams
from test_sampling import exact_nucleus, hard_rows


def rows_of_normal_numbers():
    """The hard rows but the subnormal one. TensorFlow flushes subnormal numbers to zero, so it sees
    that row as all ties, and so do its probabilities, all equal; NumPy does not. Logits are never that small."""
    return np.array([row for row in hard_rows() if np.abs(row).max() > 1e-30])


def test_noise_is_gpt2_samplings():
    row_seeds = [[7, 0], [7, 1], [2 ** 40 + 3, 5], [2 ** 63 - 1, 2 ** 62], [-1, 3], [-2 ** 63, 0]]
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


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (0, 0, 1.0), (1.0, 0, 1.0), (1e-9, 0, 1.0), (2.0, 0, 1.0), (1.0, 1, 1.0), (1.0, 40, 1.0), (0.7, 40, 1.0),
    (1.0, 1000, 1.0), (1.0, 60000, 1.0), (1.0, 0, 0.9), (0.7, 0, 0.5), (1.0, 0, 1e-6), (1.0, 0, 0.999999),
    (1.0, 40, 0.9)])
def test_choose_draws_the_tokens_of_the_compiled_rule(temperature, top_k, top_p):
    rows = rows_of_normal_numbers()
    hparams = HParams(n_vocab=rows.shape[1])
    rule, draw = sampling_settings(hparams, len(rows), temperature, top_k, top_p, seed=42, first_sample=3,
                                   stop_token=None)
    compiled_choose = tf.function(sampling.choose, jit_compile=True)
    for step in (0, 7, 1023):
        want = compiled_choose(tf.constant(rows), tf.constant(step), draw.row_seeds, draw.temperature, draw.top_p, rule)
        got = numpy_sampling.choose(rows, step, row_seeds(len(rows), 42, 3), temperature, top_k, top_p)
        np.testing.assert_array_equal(got, want.numpy(), err_msg=f"step {step}")
        assert got.dtype == np.int32


def test_a_tiny_temperature_draws_among_the_largest_logits_without_warnings():
    rows = rows_of_normal_numbers()
    with np.errstate(over="ignore"):
        scaled = rows / np.float32(1e-9)  # the largest logits of some rows are all +inf now: ties
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for top_k, top_p in ((0, 1.0), (0, 0.9), (40, 0.9)):
            tokens = numpy_sampling.choose(rows, 3, row_seeds(len(rows), 1, 0), 1e-9, top_k, top_p)
            assert (scaled[np.arange(len(rows)), tokens] == scaled.max(axis=1)).all()


@pytest.mark.parametrize("stop_token", [9, None])
def test_a_stopped_row_repeats_the_stop_token_as_in_the_compiled_rule(stop_token):
    token, done = np.array([5, 9, 2, 9], np.int32), np.array([False, False, True, True])
    rule = sampling.Rule(greedy=True, top_k=0, use_top_p=False, stop_token=stop_token)
    want_token, want_done = sampling.mark_stopped(tf.constant(token), tf.constant(done), rule)
    got_token, got_done = numpy_sampling.mark_stopped(token, done, stop_token)
    np.testing.assert_array_equal(got_token, want_token.numpy())
    np.testing.assert_array_equal(got_done, want_done.numpy())
    assert got_token.tolist() == ([5, 9, 9, 9] if stop_token else [5, 9, 2, 9])
