"""The float32 engine (gpt2.decode.XlaEngine) against step-by-step recomputation: greedy, seeds,
distributions, batches, chunks, replicas."""
import collections
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from gpt2 import decode, testing
from gpt2.decode import XlaEngine
from gpt2.engine import Request, Settings, bucket, decode_requests, shared_prefix_length
from gpt2.model import cached_block
from gpt2.sampling import uniform_noise
from gpt2.tensorflow_start import Compiled
from test_sampling import softmax, sorted_top_k_filter, sorted_top_p_filter

PROMPT = [10, 200, 33, 5, 400, 17]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sample(params, hparams, context, length, *, batch_size=1, first_sample=0, **flags):
    """batch_size samples of `context` (first_sample, first_sample + 1, ...), as token lists."""
    return together(params, hparams, [list(context)] * batch_size, length, sample=first_sample, **flags)


def together(params, hparams, contexts, length, **flags):
    """The continuations of `contexts`, all in one engine's rows."""
    engine = XlaEngine(params, hparams, len(contexts), contexts[0][:shared_prefix_length(contexts)])
    return testing.sample(engine, contexts, length, **flags)


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
    for prompt, row in zip(prompts, together(params, hparams, prompts, 10, temperature=0)):
        assert sample(params, hparams, prompt, 10, temperature=0) == [row]


def test_rows_share_the_tokens_their_prompts_start_with_but_the_last():
    assert shared_prefix_length([[1, 2, 3, 4]] * 3) == 3  # each row feeds its last token itself
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 4, 6]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2]]) == 1
    assert shared_prefix_length([[1, 2], [3, 2]]) == 0
    assert shared_prefix_length([[7]]) == 0


def test_prompts_with_nothing_in_common_share_a_batch(model):
    hparams, params = model
    prompts = [PROMPT, [11] + PROMPT[1:], [3, 4]]
    for prompt, row in zip(prompts, together(params, hparams, prompts, 10, temperature=0)):
        assert sample(params, hparams, prompt, 10, temperature=0) == [row]


def test_steps_of_any_size_give_the_same_tokens(model):
    hparams, params = model
    requests = [Request(PROMPT, 25, Settings(seed=11, sample=i)) for i in range(2)]

    def steps(**chunking):  # the tokens each step made, [rows, made] each
        made = collections.defaultdict(list)
        for piece in decode_requests(XlaEngine(params, hparams, 2, PROMPT[:-1]), requests, **chunking):
            made[piece.index].append(piece.tokens)
        assert [len(a) for a in made[0]] == [len(b) for b in made[1]]
        return [np.stack(pair) for pair in zip(made[0], made[1])]

    whole = steps()
    assert [step.shape[1] for step in whole] == [25]
    pieces = steps(chunk_size=4)
    assert [step.shape[1] for step in pieces] == [4] * 6 + [1]
    np.testing.assert_array_equal(np.concatenate(pieces, axis=1), whole[0])
    # Steps of a time (streaming): the first compiles, the second measures the pace, the others
    # make as many tokens as fit in chunk_seconds at that pace.
    for chunk_seconds, sizes in [(1e6, [1, 1, 23]), (1e-9, [1] * 25)]:
        timed = steps(chunk_seconds=chunk_seconds)
        assert [step.shape[1] for step in timed] == sizes
        np.testing.assert_array_equal(np.concatenate(timed, axis=1), whole[0])


class CtrlCWhenHashed:
    """A value whose hash raises KeyboardInterrupt: as if Ctrl-C landed while TensorFlow hashed it."""
    __slots__ = ()  # no weak references, so tf.function hashes it to read its type

    def __hash__(self):
        raise KeyboardInterrupt


def test_ctrl_c_while_tensorflow_reads_the_arguments_stays_a_keyboard_interrupt(model):
    """On a copy of the decoding loop, wrapped as the loop is: TensorFlow keeps a tf.function's lock
    (held by this thread) after an error while it reads the arguments, and the shared loop would
    then make every other thread's call wait for ever (the engine tests call it from threads)."""
    hparams, params = model
    with pytest.raises(TypeError, match="TraceType"):  # what TensorFlow makes of it on its own
        tf.function(lambda x: x)(CtrlCWhenHashed())
    assert isinstance(decode._advance.__wrapped__, Compiled)  # the loop is wrapped by raises_ctrl_c
    loop = decode.raises_ctrl_c(Compiled(decode._advance.__wrapped__.python_function, jit_compile=True))
    with pytest.raises(KeyboardInterrupt):  # the decoding loop's static arguments are read as the loop is called
        loop(params, None, None, 1, hparams=CtrlCWhenHashed(), logprobs=False)


def test_other_prompts_and_flags_in_the_same_cache_bucket_compile_nothing_new(model):
    """Prompts of 5, 9 and 7 tokens with 6 new ones all fit a 16-slot cache, and flags are data of
    the loop: one compiled loop serves greedy, top_k, top_p, plain and penalized rows, admitted at
    any time (a logit_bias or bad words of one entry fit the rows' lists as they are)."""
    hparams, params = model
    advance = decode._advance.__wrapped__.function  # the tf.function
    engine = XlaEngine(params, hparams, 2)
    # Row 0 stays admitted, so the state keeps both rows (see XlaEngine.fit_width); the others take row 1.
    first, second = engine.admit([Request(PROMPT[:5], 6, Settings(top_k=3, seed=1)), Request(PROMPT[:4], 6, Settings())])
    engine.step(2)
    engine.release(second)
    loops, blocks = advance.experimental_get_tracing_count(), cached_block.experimental_get_tracing_count()
    for prompt, settings in [(PROMPT + [1, 2, 3], Settings(temperature=0)), (PROMPT + [4], Settings(top_p=0.5)),
                             (PROMPT[:3], Settings(temperature=0.7, top_k=40, top_p=0.9, seed=5, sample=3)),
                             (PROMPT, Settings(repetition_penalty=1.2, repeat_last_n=3, min_p=0.1)),
                             (PROMPT, Settings(presence_penalty=0.5, frequency_penalty=-0.5, no_repeat_ngram_size=2)),
                             (PROMPT, Settings(logit_bias=((3, 5.0),), bad_words=((9,),), repetition_penalty=0.7))]:
        engine.admit([Request(prompt, 6, settings)])
        while engine.live:
            engine.step(3)
        engine.release(second)
        assert advance.experimental_get_tracing_count() == loops
    # Another cache size and another number of rows need a loop of their own, but not another graph of the block.
    together(params, hparams, [PROMPT, [PROMPT[0] + 1] + PROMPT], 30, top_k=3, seed=2)
    assert advance.experimental_get_tracing_count() > loops
    assert cached_block.experimental_get_tracing_count() == blocks


def test_the_state_holds_the_rows_in_use_and_their_tokens_do_not_change(model):
    """Rows 0 to 3 admitted: four rows stepped. Rows 1 to 3 released: row 0 goes on alone, in a
    state of one row; a row admitted again (row 1) widens it to two, with row 0's cache kept."""
    hparams, params = model
    engine = XlaEngine(params, hparams, 4)
    requests = [Request(PROMPT[:3 + i], 12, Settings(top_k=5, seed=i)) for i in range(4)]
    rows = engine.admit(requests)
    assert engine.width() == 4
    made = {row: engine.step(3).tokens[row].tolist() for row in [0]}
    for row in rows[1:]:
        engine.release(row)
    made[0] += engine.step(3).tokens[0].tolist()
    assert engine.width() == 1
    [again] = engine.admit([Request(PROMPT, 5, Settings(temperature=0))])
    assert again == 1 and engine.width() == 2
    step = engine.step(6)
    made[0] += step.tokens[0].tolist()
    alone = XlaEngine(params, hparams, 1)
    alone.admit([requests[0]])
    assert made[0] == alone.step(12).tokens[0].tolist()
    other = XlaEngine(params, hparams, 1)
    other.admit([Request(PROMPT, 5, Settings(temperature=0))])
    assert step.tokens[1].tolist() == other.step(5).tokens[0].tolist()


TWO_CPUS = """
import sys
import numpy as np
import tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)
import gpt2
from gpt2.testing import sample
two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
one = gpt2.GPT2.from_folder(sys.argv[1])
spread = gpt2.GPT2.from_folder(sys.argv[1], strategy=two)
engine = spread.engine(3)
devices = [e.params["wte"].device[-5:] for e in engine.engines]
assert devices == ["CPU:0", "CPU:1"] and [e.rows for e in engine.engines] == [2, 1], devices
# 5 samples in batches of 3 (2 rows on the first replica, 1 on the second).
flags = dict(length=20, nsamples=5, batch_size=3, top_k=5, seed=7, ignore_eot=True)
texts = one.generate("", **flags)
assert spread.generate("", **flags) == texts and len(set(texts)) == 5, texts
nucleus = {**flags, "top_k": 0, "top_p": 0.9}
assert spread.generate(["A prompt", "B"], **nucleus) == one.generate(["A prompt", "B"], **nucleus)
# Greedy rows: 0 and 1 continue [1], 2 and 3 continue [2]. The stop token is one that the first
# pair makes after a few steps and the second pair not until later: the replica of the first
# pair's rows has no live rows left while the other's go on.
contexts = [[1], [1], [2], [2]]
def tokens(model, stop_token):
    return sample(model.engine(4), contexts, 24, temperature=0, stop_token=stop_token)
free = tokens(one, None)
step = next(j for j in range(1, 20) if free[0][j] not in free[0][:j] and free[0][j] not in free[2][:j + 4])
stop = int(free[0][step])
alone = tokens(one, stop)
assert [len(row) for row in alone[:2]] == [step, step] and all(len(row) > step + 4 for row in alone[2:]), alone
assert tokens(spread, stop) == alone
print("same")
"""


@pytest.mark.slow
def test_two_replicas_generate_what_one_device_generates(tiny_model):
    """Rows spread over two logical CPUs (an engine on each, with its copy of the weights, stepped
    in threads of their own) give sample i of a seed as one device gives it; a replica whose
    rows all ended waits for the other."""
    result = subprocess.run([sys.executable, "-c", TWO_CPUS, str(tiny_model)], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "same"
