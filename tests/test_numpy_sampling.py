"""The token rules in NumPy draw the tokens that gpt2.sampling's compiled rules draw."""
import warnings

import numpy as np
import pytest
import tensorflow as tf

from gpt2 import engine, numpy_sampling, sampling
from test_sampling import exact_nucleus, hard_rows

FLAG_SETS = [  # (temperature, top_k, top_p)
    (0, 0, 1.0), (1.0, 0, 1.0), (1e-9, 0, 1.0), (2.0, 0, 1.0), (1.0, 1, 1.0), (1.0, 40, 1.0), (0.7, 40, 1.0),
    (1.0, 1000, 1.0), (1.0, 60000, 1.0), (1.0, 0, 0.9), (0.7, 0, 0.5), (1.0, 0, 1e-6), (1.0, 0, 0.999999),
    (1.0, 40, 0.9)]


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


def row_seeds(rows, seed, first_sample):
    """[rows, 2] int64: samples first_sample, first_sample + 1, ... of `seed`."""
    return np.array([[seed, first_sample + row] for row in range(rows)], np.int64)


compiled_choose = tf.function(sampling.choose, jit_compile=True)


def compiled_draw(rows, steps, temperature, top_k, top_p, min_p=0.0):
    """gpt2.sampling.choose, compiled as in the decoding loop, on rows [batch, n_vocab] with samples 3, 4, ...
    of seed 42 and per-row (or one for all) steps and flags; top_k cut to n_vocab, as an engine's rows have it."""
    batch, n_vocab = rows.shape
    steps, temperature, top_k, top_p, min_p = (np.broadcast_to(x, [batch])
                                               for x in (steps, temperature, top_k, top_p, min_p))
    draws = sampling.Draws(tf.constant(row_seeds(batch, 42, 3)), tf.constant(steps, tf.int32),
                           tf.constant(temperature, tf.float32), tf.constant(np.minimum(top_k, n_vocab), tf.int32),
                           tf.constant(top_p, tf.float32), tf.constant(min_p, tf.float32))
    return compiled_choose(tf.constant(rows), draws).numpy()


@pytest.mark.parametrize("temperature,top_k,top_p", FLAG_SETS)
def test_choose_draws_the_tokens_of_the_compiled_rule(temperature, top_k, top_p):
    rows = rows_of_normal_numbers()
    for step in (0, 7, 1023):
        want = compiled_draw(rows, step, temperature, top_k, top_p)
        got = numpy_sampling.choose(rows, step, row_seeds(len(rows), 42, 3), temperature, top_k, top_p)
        np.testing.assert_array_equal(got, want, err_msg=f"step {step}")
        assert got.dtype == np.int32


def test_choose_takes_each_rows_own_step_and_flags_as_the_compiled_rule():
    """Rows of every flag set above, at steps of their own, in one batch: an engine's rows each carry theirs."""
    rows = rows_of_normal_numbers()
    temperature, top_k, top_p = (np.array(column) for column in zip(*(FLAG_SETS * 3)[:len(rows)]))
    steps = np.arange(len(rows), dtype=np.int32) * 37
    got = numpy_sampling.choose(rows, steps, row_seeds(len(rows), 42, 3), temperature, top_k, top_p)
    np.testing.assert_array_equal(got, compiled_draw(rows, steps, temperature, top_k, top_p))


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(1.0, 0, 1.0, 0.05), (0.7, 40, 1.0, 0.1),
                                                             (1.0, 0, 0.9, 0.2), (1.5, 1000, 0.95, 0.5)])
def test_min_p_draws_the_tokens_of_the_compiled_rule(temperature, top_k, top_p, min_p):
    rows = rows_of_normal_numbers()
    for step in (0, 7):
        want = compiled_draw(rows, step, temperature, top_k, top_p, min_p)
        got = numpy_sampling.choose(rows, step, row_seeds(len(rows), 42, 3), temperature, top_k, top_p, min_p)
        np.testing.assert_array_equal(got, want, err_msg=f"step {step}")


def random_adjustments(rng, batch, n_vocab):
    """Adjustments' fields for `batch` rows, every rule on in some rows and off in others: texts of
    20 to 60 tokens from a small alphabet (so that tokens and n-grams repeat)."""
    lengths = rng.integers(20, 61, batch)
    history = np.zeros([batch, 64], np.int32)
    for row, n in zip(history, lengths):
        row[:n] = rng.integers(0, 12, n)
    bias_tokens = np.full([batch, 4], sampling.NO_TOKEN, np.int32)
    for row in bias_tokens[::2]:  # a bias on 3 tokens of every other row
        row[:3] = rng.choice(n_vocab, 3, replace=False)
    bad_words = np.full([batch, 2, 3], sampling.NO_TOKEN, np.int32)
    bad_words[1::3, 0, :1] = rng.integers(0, 12, [len(bad_words[1::3]), 1])  # one-token words
    bad_words[::3, 1, :2] = [3, 4]  # "3 4": its 4 is banned after a 3
    return dict(history=history, text_len=lengths.astype(np.int32), prompt_len=(lengths // 2).astype(np.int32),
                bias_tokens=bias_tokens, bias_values=rng.uniform(-100, 100, [batch, 4]).astype(np.float32),
                bad_words=bad_words, no_repeat_ngram_size=rng.choice([0, 1, 2, 3], batch).astype(np.int32),
                repetition_penalty=rng.choice([1.0, 1.2, 0.8], batch).astype(np.float32),
                repeat_last_n=rng.choice([0, 5, 100], batch).astype(np.int32),
                presence_penalty=rng.choice([0.0, 0.5, -1.5], batch).astype(np.float32),
                frequency_penalty=rng.choice([0.0, 0.3, 2.0], batch).astype(np.float32))


def test_adjust_gives_the_logits_of_the_compiled_rules():
    """Every rule at once, some rows with each: NumPy's adjusted logits are the compiled ones, bit for bit."""
    rows = rows_of_normal_numbers()[:, :40]
    fields = random_adjustments(np.random.default_rng(5), len(rows), rows.shape[1])
    want = tf.function(sampling.adjust, jit_compile=True)(
        tf.constant(rows), engine.Adjustments(**{name: tf.constant(value) for name, value in fields.items()}))
    got = numpy_sampling.adjust(rows, **fields)
    np.testing.assert_array_equal(got, want.numpy())
    assert np.isinf(got).any() and (got != rows).any(axis=1).mean() > 0.5


def test_a_tiny_temperature_draws_among_the_largest_logits_without_warnings():
    rows = rows_of_normal_numbers()
    with np.errstate(over="ignore"):
        scaled = rows / np.float32(1e-9)  # the largest logits of some rows are all +inf now: ties
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for top_k, top_p in ((0, 1.0), (0, 0.9), (40, 0.9)):
            tokens = numpy_sampling.choose(rows, 3, row_seeds(len(rows), 1, 0), 1e-9, top_k, top_p)
            assert (scaled[np.arange(len(rows)), tokens] == scaled.max(axis=1)).all()


def test_kth_largest_equals_numpys_partition():
    rng = np.random.default_rng(7)
    row = rng.standard_normal(50257).astype(np.float32)
    tied = np.round(row * 2).astype(np.float32)  # many equal numbers
    tied[::3] = -np.inf
    tied[-5:] = 9.0  # the largest numbers in the short last lane
    for values in (row, tied):
        for k in (1, 2, 5, 6, 40, 785, 786, 1000, 50256):
            assert numpy_sampling.kth_largest(values, k) == np.partition(values, -k)[-k], k
    for n in (1, 63, 64, 657, 1000):
        values = rng.standard_normal(n).astype(np.float32)
        for k in range(1, n + 1, max(1, n // 50)):
            assert numpy_sampling.kth_largest(values, k) == np.partition(values, -k)[-k], (n, k)
