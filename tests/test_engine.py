"""The decoding engine's rows live their own lives (gpt2.engine), on float32 and int8 weights alike:
admitted at any step, beside any other rows, released and reused, from several threads at once."""
import concurrent.futures

import numpy as np
import pytest
import tensorflow as tf

import gpt2
from gpt2.engine import Request, Settings
from gpt2.model import forward, logits
from gpt2.testing import sample

REQUESTS = {  # name -> (prompt tokens, length, settings): each row with other flags, penalties and lists
    "a": ([10, 200, 33, 5, 400, 17, 3, 90], 14, Settings(top_k=40, seed=1, repetition_penalty=1.3,
                                                         logit_bias=((7, 3.0), (90, -100.0)))),
    "b": ([7, 8], 9, Settings(top_p=0.9, seed=2, sample=4, presence_penalty=0.5, frequency_penalty=0.5)),
    "c": ([600, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], 20,
          Settings(temperature=0, no_repeat_ngram_size=2, bad_words=((40,), (5, 6)))),
    "d": ([5], 12, Settings(temperature=0.7, top_k=5, top_p=0.95, seed=3, min_p=0.05, logprobs=3)),
    "e": ([44, 45, 46], 30, Settings(seed=9, repetition_penalty=0.9, repeat_last_n=4)),
}


@pytest.fixture(scope="module", params=["float32", "int8"])
def model(request, tiny_model):
    return gpt2.GPT2.from_folder(tiny_model, request.param)


def alone(model, name):
    """The tokens of a request run by itself, in an engine of one row."""
    tokens, length, settings = REQUESTS[name]
    [row] = sample(model.engine(1, tokens[:-1]), [tokens], length, **settings._asdict())
    return row


def test_rows_admitted_at_other_steps_and_into_reused_rows_make_what_they_make_alone(model):
    """Three rows: a starts alone, b joins after 3 steps, c after 5; b is released before it ends
    and d takes its row; a ends and e takes its row. d's and e's prompts are shorter than what
    their rows held, so a leak of the earlier row's cache would change their tokens."""
    engine = model.engine(3)
    made = {name: [] for name in REQUESTS}
    row_of = {}

    def admit(name):
        tokens, length, settings = REQUESTS[name]
        [row_of[name]] = engine.admit([Request(tokens, length, settings)])

    def step(n):
        step = engine.step(n)
        for name, row in row_of.items():
            if row in step.tokens:
                made[name] += step.tokens[row].tolist()
        return step

    admit("a")
    step(3)
    admit("b")
    step(2)
    admit("c")
    step(1)
    engine.release(row_of.pop("b"))  # 3 of its 9 tokens made
    admit("d")
    assert row_of["d"] != row_of["a"] and row_of["d"] != row_of["c"]
    while row_of["a"] not in step(4).ended:
        pass
    engine.release(row_of.pop("a"))
    admit("e")
    while engine.live:
        step(5)
    assert made["b"] == alone(model, "b")[:3]
    for name in "acde":
        assert made[name] == alone(model, name), name
    assert sorted(engine.free) == [] and len(made["e"]) == 30
    # A short prompt after the long rows ended, into the caches they grew.
    for row in row_of.values():
        engine.release(row)
    made["b"], row_of = [], {}
    admit("b")
    while engine.live:
        step(4)
    assert made["b"] == alone(model, "b")


def test_rows_admitted_together_with_other_and_same_prompts_make_what_they_make_alone(model):
    """One admit of four requests: two with the same prompt (run once, its cache copied), given in
    an order other than their prompts' sorted one."""
    engine = model.engine(5)
    names = ["c", "a", "d", "a"]
    requests = [Request(*REQUESTS[name]) for name in names]
    requests[3] = requests[3]._replace(settings=requests[3].settings._replace(seed=5))
    rows = engine.admit(requests)
    made = {row: [] for row in rows}
    while engine.live:
        for row, new in engine.step(6).tokens.items():
            made[row] += new.tolist()
    for name, row in zip(names[:3], rows):
        assert made[row] == alone(model, name), name
    tokens, length, settings = REQUESTS["a"]
    [other_seed] = sample(model.engine(1), [tokens], length, **settings._replace(seed=5)._asdict())
    assert made[rows[3]] == other_seed != made[rows[1]]


def test_a_row_ends_at_its_stop_token_and_the_others_go_on(model):
    tokens, length, settings = REQUESTS["e"]
    free = alone(model, "e")
    stop = next(t for i, t in enumerate(free) if i >= 3 and t not in free[:i])
    engine = model.engine(2)
    rows = engine.admit([Request(tokens, length, settings._replace(stop_token=stop)), Request(*REQUESTS["d"])])
    ended, made = {}, {row: [] for row in rows}
    while engine.live:
        step = engine.step(4)
        for row, new in step.tokens.items():
            made[row] += new.tolist()
        ended.update({row: len(made[row]) for row in step.ended})
    assert made[rows[0]] == free[:free.index(stop) + 1]  # the stop token is its last
    assert made[rows[1]] == alone(model, "d") and ended[rows[1]] == 12


def test_admitting_what_does_not_fit_is_refused(model):
    engine = model.engine(2, [10, 200])
    with pytest.raises(ValueError, match="3 requests but 2 free rows"):
        engine.admit([Request([10, 200, 3], 4, Settings())] * 3)
    with pytest.raises(ValueError, match="start with the engine's prefix"):
        engine.admit([Request([10, 201, 3], 4, Settings())])
    with pytest.raises(ValueError, match="do not fit the model's context of 128"):
        engine.admit([Request([10, 200, 3], 127, Settings())])
    [row] = engine.admit([Request([10, 200, 3], 126, Settings())])
    with pytest.raises(ValueError, match="is not admitted"):
        engine.release(1 - row)


PROMPTS = ["The river", "In the town there was a market", "def greet(name):", ""]
FLAGS = [dict(seed=1, top_k=40), dict(seed=2, top_p=0.9), dict(temperature=0), dict(seed=4, temperature=0.8)]


def test_threads_and_interleaved_streams_on_one_model_give_what_each_gives_alone(model):
    """One model object, shared: its engines do not share rows (int8's take turns with its programs)."""
    expected = ["".join(model.stream(prompt, 24, ignore_eot=True, **flags)) for prompt, flags in zip(PROMPTS, FLAGS)]
    streams = [model.stream(prompt, 24, ignore_eot=True, **flags) for prompt, flags in zip(PROMPTS, FLAGS)]
    texts, running = [""] * len(streams), set(range(len(streams)))
    while running:  # a piece of each stream in turn
        for i in sorted(running):
            piece = next(streams[i], None)
            if piece is None:
                running.discard(i)
            else:
                texts[i] += piece
    assert texts == expected

    def from_a_thread(i):
        text = "".join(model.stream(PROMPTS[i], 24, ignore_eot=True, **FLAGS[i]))
        samples = model.generate(PROMPTS[i], 24, ignore_eot=True, nsamples=3, batch_size=2, **FLAGS[i])
        return text, samples

    with concurrent.futures.ThreadPoolExecutor(4) as threads:
        results = list(threads.map(from_a_thread, range(4)))
    assert [text for text, _ in results] == expected
    for i, (_, samples) in enumerate(results):
        assert samples == model.generate(PROMPTS[i], 24, ignore_eot=True, nsamples=3, batch_size=3, **FLAGS[i])
        assert samples[0] == expected[i]


def test_no_repeated_bigram_no_banned_word_and_a_biased_token_in_greedy_text(model):
    """no_repeat_ngram_size 2 on a long greedy sample (which loops without it); bad_words; logit_bias +100."""
    [looping] = model.generate("The river", 100, temperature=0, ignore_eot=True, logprobs=0)
    bigrams = list(zip(looping.tokens, looping.tokens[1:]))
    assert len(set(bigrams)) < len(bigrams)
    [sample] = model.generate("The river", 100, temperature=0, ignore_eot=True, no_repeat_ngram_size=2, logprobs=0)
    tokens = model.encode("The river")[-1:] + sample.tokens  # the prompt's bigrams count too
    bigrams = list(zip(tokens, tokens[1:]))
    assert len(set(bigrams)) == len(bigrams) and len(sample.tokens) == 100
    word = model.decode(looping.tokens[3:4]).strip()  # a word greedy text makes
    assert word and word in looping.text
    [banned] = model.generate("The river", 100, temperature=0, ignore_eot=True, bad_words=[word, "mill"])
    assert word not in banned and "mill" not in banned
    [biased] = model.generate("The river", 5, temperature=0, ignore_eot=True, logit_bias={42: 100}, logprobs=0)
    assert biased.tokens == [42] * 5


def test_logprobs_are_the_models_own_sorted_and_n_long(model):
    """The chosen token's log-probability and the top 4, at temperature 1 with no filters, against
    float64 log-softmaxes of the logits recomputed from scratch (int8: of its own logits, so only
    their order and length)."""
    prompt = model.encode("The river")
    [sample] = model.generate("The river", 16, seed=3, ignore_eot=True, logprobs=4, top_k=40, repetition_penalty=2.0)
    assert len(sample.tokens) == len(sample.logprobs) == len(sample.top_logprobs) == 16
    for logprob, top in zip(sample.logprobs, sample.top_logprobs):
        assert len(top) == 4 and [v for _, v in top] == sorted([v for _, v in top], reverse=True)
        assert logprob <= top[0][1] + 1e-6
    if model.int8:
        return
    tokens = tf.constant([prompt + sample.tokens])
    rows = logits(model.params, forward(model.params, model.hparams, tokens))[0].numpy().astype(np.float64)
    rows = rows[len(prompt) - 1:-1]
    logprobs = rows - rows.max(axis=1, keepdims=True)
    logprobs -= np.log(np.exp(logprobs).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(sample.logprobs, logprobs[np.arange(16), sample.tokens], atol=1e-5)
    for row, top in zip(logprobs, sample.top_logprobs):
        np.testing.assert_allclose([v for _, v in top], np.sort(row)[::-1][:4], atol=1e-5)
        np.testing.assert_allclose(row[[t for t, _ in top]], [v for _, v in top], atol=1e-5)
