"""The decoding loop against step-by-step recomputation: greedy, seeds, distributions, batches, chunks, replicas."""
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from gpt2 import decode
from gpt2.decode import bucket, sample, sample_chunks, shared_prefix_length
from gpt2.model import cached_block
from gpt2.sampling import Rule, compiled_uniform_noise, uniform_noise
from test_sampling import softmax, sorted_top_k_filter, sorted_top_p_filter

PROMPT = [10, 200, 33, 5, 400, 17]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


@pytest.mark.parametrize("top_k,top_p", [(40, 1.0), (0, 0.9)])
def test_a_seed_gives_the_text_that_sorting_filters_gave(model, full_logits, top_k, top_p):
    """Each token against the draw, with the same noise, through the filters as they were before
    2026-11 from logits recomputed from scratch: the same seed gives the same text as then."""
    hparams, params = model
    [row] = sample(params, hparams, PROMPT, 20, top_k=top_k, top_p=top_p, seed=8)
    tokens = list(PROMPT)
    for step, token in enumerate(row):
        next_logits = tf.constant(full_logits(tokens)[-1:])
        next_logits = sorted_top_k_filter(next_logits, top_k) if top_k else sorted_top_p_filter(next_logits, top_p)
        noise = uniform_noise(tf.constant([[8, 0]], tf.int64), tf.constant(step), hparams.n_vocab).numpy()
        assert token == np.argmax(next_logits.numpy()[0] - np.log(-np.log(noise[0])))
        tokens.append(token)
    assert len(row) == 20


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
    # Chunks of a time (streaming): the first call compiles, the second measures the pace, the
    # others make as many tokens as fit in chunk_seconds at that pace.
    for chunk_seconds, sizes in [(1e6, [1, 1, 1, 22]), (1e-9, [1] * 25)]:
        timed = list(sample_chunks(params, hparams, [PROMPT] * 2, 25, seed=11, chunk_seconds=chunk_seconds))
        assert [chunk.shape[1] for chunk in timed] == sizes
        np.testing.assert_array_equal(np.concatenate(timed, axis=1), np.concatenate(whole, axis=1))


class CtrlCWhenHashed:
    """A value whose hash raises KeyboardInterrupt: as if Ctrl-C landed while TensorFlow hashed it."""
    __slots__ = ()  # no weak references, so tf.function hashes it to read its type

    def __hash__(self):
        raise KeyboardInterrupt


def test_ctrl_c_while_tensorflow_reads_the_arguments_stays_a_keyboard_interrupt(model):
    hparams, params = model
    with pytest.raises(TypeError, match="TraceType"):  # what TensorFlow makes of it on its own
        tf.function(lambda x: x)(CtrlCWhenHashed())
    with pytest.raises(KeyboardInterrupt):  # the decoding loop's rule is read as the loop is called
        decode._advance(params, None, None, 0, 1, None, hparams=hparams, rule=Rule(False, 0, False, CtrlCWhenHashed()))


def test_a_prompt_of_another_length_in_the_same_cache_bucket_compiles_nothing_new(model):
    """Prompts of 5, 9 and 7 tokens with 6 new ones all fit a 16-slot cache: one decoding loop serves them,
    and the prompt's pass (op by op) draws its first token with the same compiled noise."""
    hparams, params = model
    advance = decode._advance.__wrapped__.function  # the tf.function
    noise = compiled_uniform_noise.function
    sample(params, hparams, PROMPT[:5], 6, top_k=3, seed=1)
    loops, noises = advance.experimental_get_tracing_count(), noise.experimental_get_tracing_count()
    blocks = cached_block.experimental_get_tracing_count()
    for prompt in (PROMPT + [1, 2, 3], PROMPT + [4]):
        sample(params, hparams, prompt, 6, top_k=3, seed=2)
        assert advance.experimental_get_tracing_count() == loops
        assert noise.experimental_get_tracing_count() == noises
    # Another cache size and another batch (of prompts that share no start) need a loop of their
    # own, but not another graph of the block.
    list(sample_chunks(params, hparams, [PROMPT, [PROMPT[0] + 1] + PROMPT], 30, top_k=3, seed=2))
    assert cached_block.experimental_get_tracing_count() == blocks


TWO_CPUS = """
import sys
import numpy as np
import tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)
import gpt2
from gpt2.decode import replicated, sample_chunks
two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
one = gpt2.GPT2.from_folder(sys.argv[1])
spread = gpt2.GPT2.from_folder(sys.argv[1], strategy=two)
copies = two.experimental_local_results(spread._replica_params)  # the weights, on each replica's device
assert [c["wte"].device[-5:] for c in copies] == ["CPU:0", "CPU:1"], [c["wte"].device for c in copies]
# 5 samples in batches of 3 (the second replica's share of the first batch is one row and a copy) and 2.
flags = dict(length=20, nsamples=5, batch_size=3, top_k=5, seed=7, ignore_eot=True)
texts = one.generate("", **flags)
assert spread.generate("", **flags) == texts and len(set(texts)) == 5, texts
nucleus = {**flags, "top_k": 0, "top_p": 0.9}
assert spread.generate(["A prompt", "B"], **nucleus) == one.generate(["A prompt", "B"], **nucleus)
# Greedy rows: 0 and 1 (the first replica's) continue [1], 2 and 3 continue [2]. The stop token is
# one that the first pair makes after a few steps and the second pair not until later: the first
# replica's loop stops early, and its rows repeat the stop token while the second's go on.
contexts = [[1], [1], [2], [2]]
hparams = one.hparams
def tokens(params, stop_token, strategy=None):
    return np.concatenate(list(sample_chunks(params, hparams, contexts, 24, temperature=0, stop_token=stop_token,
                                             chunk_size=5, strategy=strategy)), axis=1)
free = tokens(one.params, None)
step = next(j for j in range(1, 20) if free[0, j] not in free[0, :j] and free[0, j] not in free[2, :j + 4])
stop = int(free[0, step])
alone = tokens(one.params, stop)
assert (alone[:2, step:] == stop).all() and (alone[2:, step:step + 4] != stop).all(), alone
np.testing.assert_array_equal(tokens(replicated(one.params, two), stop, two), alone)
print("same")
"""


@pytest.mark.slow
def test_two_replicas_generate_what_one_device_generates(tiny_model):
    """A batch spread over two logical CPUs (each runs the decoding loop on its share of the rows)
    gives sample i of a seed as one device gives it; a replica whose rows all stopped waits for the other."""
    result = subprocess.run([sys.executable, "-c", TWO_CPUS, str(tiny_model)], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "same"
