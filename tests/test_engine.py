"""The decoding engine's rows live their own lives (gpt2.engine), on float32 and int8 weights alike:
admitted at any step, beside any other rows, released and reused, from several threads at once."""
import concurrent.futures

import pytest

import gpt2
from gpt2.engine import Request, Settings
from gpt2.testing import sample

REQUESTS = {  # name -> (prompt tokens, length, settings)
    "a": ([10, 200, 33, 5, 400, 17, 3, 90], 14, Settings(top_k=40, seed=1)),
    "b": ([7, 8], 9, Settings(top_p=0.9, seed=2, sample=4)),
    "c": ([600, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], 20, Settings(temperature=0)),
    "d": ([5], 12, Settings(temperature=0.7, top_k=5, top_p=0.95, seed=3)),
    "e": ([44, 45, 46], 30, Settings(seed=9)),
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
