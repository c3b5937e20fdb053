"""The Python API as a user calls it: load, generate, stream, encode, decode."""
import shutil

import numpy as np
import pytest

import gpt2
from gpt2.encoder import TextStream
from gpt2.encoder import read_encoder
from gpt2.errors import GPT2Error
from gpt2.testing import ModelMirror, sample


@pytest.fixture(scope="module")
def model(tiny_model):
    return gpt2.load("tiny", str(tiny_model.parent))


def test_generate_returns_nsamples_texts(model):
    texts = model.generate("The river", length=12, seed=3, nsamples=4, batch_size=2)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
    assert len(set(texts)) == 4
    assert model.generate("The river", length=12, seed=3, nsamples=4, batch_size=4) == texts  # batch-independent


def test_generate_is_the_decoded_sampler_output(model):
    [text] = model.generate("the mill", length=9, temperature=0, ignore_eot=True)
    [row] = sample(model.engine(1), [model.encode("the mill")], 9, temperature=0)
    assert len(row) == 9 and model.decode(row) == text


def test_stream_pieces_join_to_generate(model):
    pieces = list(model.stream("The river", length=30, seed=8))
    assert len(pieces) > 1
    assert "".join(pieces) == model.generate("The river", length=30, seed=8)[0]


def test_a_stream_comes_a_step_at_a_time(model, monkeypatch):
    """The first token comes from the step that compiles the loop, alone; then a fifth of a second's tokens a step."""
    from gpt2 import engine

    steps = []
    step = engine.Engine.step
    monkeypatch.setattr(engine.Engine, "step", lambda self, n=1: steps.append(n) or step(self, n))
    stream = model.stream("The river", length=30, seed=8, ignore_eot=True)
    first = next(stream)
    assert steps == [1] and first
    text = first + "".join(stream)
    assert steps[:2] == [1, 1] and len(steps) < 30 and sum(steps) == 30
    assert text == model.generate("The river", length=30, seed=8, ignore_eot=True)[0]
    assert "".join(model.stream("The river", length=1, seed=8)) == model.generate("The river", length=1, seed=8)[0]


def test_batch_of_prompts(model):
    prompts = ["The river", "In the town there was a market on Saturdays."]
    results = model.generate(prompts, length=10, temperature=0, nsamples=2, batch_size=3)
    assert [len(r) for r in results] == [2, 2]
    for prompt, texts in zip(prompts, results):
        assert texts == model.generate(prompt, length=10, temperature=0, nsamples=2)


def test_unconditional_from_an_empty_prompt(model):
    [text] = model.generate("", length=15, seed=2, ignore_eot=True)
    assert model.context("", 15) == [model.encoder.eot_token]
    assert text == model.decode(model.encode(text))


def test_stop_strings_end_samples(model):
    [long] = model.generate("The river", length=40, seed=5, ignore_eot=True)
    stop = long[10:13]
    [cut] = model.generate("The river", length=40, seed=5, ignore_eot=True, stop=stop)
    assert cut == long[:long.index(stop)]
    streamed = "".join(model.stream("The river", length=40, seed=5, ignore_eot=True, stop=[stop, "never"]))
    assert streamed == cut


def test_errors(model):
    with pytest.raises(GPT2Error, match="top_p"):
        model.generate("x", length=5, top_p=2)
    with pytest.raises(GPT2Error, match="which leaves room for"):
        model.generate("the mill " * 100, length=100)
    assert len(model.generate("the mill " * 100, length=100, truncate_prompt=True, temperature=0)) == 1
    with pytest.raises(GPT2Error, match="unknown model"):
        gpt2.load("nope", "/nonexistent")
    with pytest.raises(GPT2Error, match="dtype must be one of float32, float16, bfloat16"):
        gpt2.load("124M", "/nonexistent", dtype="float64")  # refused before any download


def test_context_fits_the_prompt_and_the_new_tokens(model):
    prompt = "the mill " * 5
    n = len(model.encode(prompt))
    n_ctx = model.hparams.n_ctx
    assert model.context(prompt, n_ctx + 1 - n) == model.encode(prompt)
    assert model.context(prompt, n_ctx + 5 - n, truncate_prompt=True) == model.encode(prompt)[4:]
    with pytest.raises(GPT2Error, match=f"prompt is {n} tokens, which leaves room for {n_ctx + 1 - n} new tokens"
                                        ".*set truncate_prompt"):
        model.context(prompt, n_ctx + 2 - n)
    with pytest.raises(GPT2Error, match="more than the model's context"):
        model.context("the", n_ctx + 1, truncate_prompt=True)


@pytest.mark.parametrize("flags,message", [
    ({"temperature": -1}, "temperature must be a number >= 0"), ({"top_k": -2}, "top_k must be a whole number"),
    ({"top_p": 0}, r"top_p must be a number in \(0, 1\]"), ({"top_p": 1.5}, "top_p must be"),
    ({"length": 0}, "length must be a whole number of at least 1"),
    ({"temperature": float("nan")}, "temperature must be"), ({"seed": "x"}, "seed must be a whole number"),
    ({"seed": 2 ** 64}, "seed must be"), ({"nsamples": -1}, "nsamples must be a whole number of at least 1"),
    ({"batch_size": 0}, "batch_size must be"), ({"stop": ""}, "stop must be text .* never an empty string"),
    ({"stop": ["a", ""]}, "stop must be text"),
    ({"stop": ["a", 3]}, "stop must be a string or a list of strings"),
    ({"repetition_penalty": 0}, "repetition_penalty must be a number > 0"),
    ({"repetition_penalty": -1.2}, "repetition_penalty must be"), ({"min_p": 1}, r"min_p must be a number in \[0, 1\)"),
    ({"presence_penalty": 2.5}, "presence_penalty must be a number from -2 to 2"),
    ({"logit_bias": {5: 101}}, "biases in logit_bias must be numbers from -100 to 100"),
    ({"logit_bias": {657: 1}}, "logit_bias names token 657, but the model has 657 tokens"),
    ({"bad_words": ["a", ""]}, "bad_words must be text never generated, never an empty string"),
    ({"logprobs": 21}, "logprobs must be a whole number from 0 to 20"),
])
def test_impossible_arguments_are_named(model, flags, message):
    """Each check names the parameter as the API calls it (the command line says --name)."""
    with pytest.raises(GPT2Error, match=message) as error:
        model.generate("x", **{"length": 5, **flags})
    assert not str(error.value).startswith("--")


@pytest.mark.parametrize("prompt", [123, ["a", None], [], None])
def test_prompts_must_be_text(model, prompt):
    with pytest.raises(GPT2Error, match="prompt must be a string"):
        model.generate(prompt, length=3)


@pytest.mark.parametrize("call,message", [
    (lambda m: m.decode([-1]), "tokens must be token ids: whole numbers from 0 to 656, not -1"),
    (lambda m: m.decode([2 ** 70]), "tokens must be token ids: .*, not 1180591620717411303424"),
    (lambda m: m.decode(np.array([3, 657])), "tokens must be token ids: .*, not 657"),
    (lambda m: m.decode([1.5]), "tokens must be token ids: .*, not 1.5"),
    (lambda m: m.decode(["a"]), "tokens must be token ids: .*, not 'a'"),
    (lambda m: m.decode("ab"), "tokens must be a list of token ids: .*, not 'ab'"),
    (lambda m: m.decode(None), "tokens must be a list of token ids"),
    (lambda m: m.encode(123), "text must be a string, not 123"),
    (lambda m: m.context(None, 5), "prompt must be a string, not None"),
    (lambda m: m.generate("a", 3, first_sample=2 ** 70), "first_sample must be a whole number from 0 to 2\\*\\*62 - 1"),
    (lambda m: m.save(123), "model_dir must be a path"),
    (lambda m: gpt2.load("tiny", 123), "models_dir must be a path"),
    (lambda m: gpt2.GPT2.from_folder(None), "model_dir must be a path"),
])
def test_wrong_arguments_are_gpt2_errors(model, call, message):
    """Not bare TypeError, ValueError or OverflowError: the README promises gpt2.GPT2Error."""
    with pytest.raises(GPT2Error, match=message):
        call(model)


def test_decode_takes_lists_tuples_and_arrays(model):
    tokens = model.encode("the mill")
    assert model.decode(tokens) == model.decode(tuple(tokens)) == model.decode(np.array(tokens)) == "the mill"
    assert model.decode([]) == ""


def test_a_batch_too_large_for_memory_is_refused_with_the_largest_that_fits(model, monkeypatch):
    from gpt2 import api

    assert api.available_memory() > 0  # this machine's, read from /proc/meminfo
    monkeypatch.setattr(api, "available_memory", lambda: 10_000_000)
    with pytest.raises(GPT2Error) as error:
        model.generate("", length=100, nsamples=4096, batch_size=4096)
    fits = int(str(error.value).split("use batch_size ")[1].split()[0])
    need = api.byte_size(api.decoding_memory(model.hparams, 4096, 1, 100, 4))
    assert str(error.value) == (f"batch_size 4096 with length 100 needs about {need} of memory beyond the model's "
                                f"weights, but 10.0 MB is available: use batch_size {fits} or less")
    assert 1 < fits < 4096
    assert len(model.generate("", length=100, nsamples=fits, batch_size=fits, seed=1)) == fits  # the largest fits
    with pytest.raises(GPT2Error, match=f"batch_size {fits + 1} with length 100 needs about"):
        model.generate("", length=100, nsamples=fits + 1, batch_size=fits + 1)
    monkeypatch.setattr(api, "available_memory", lambda: 1000)
    with pytest.raises(GPT2Error, match="not even one sample of 100 tokens fits: lower length or free some memory"):
        model.generate("", length=100)


def test_load_downloads_a_missing_model(tiny_model, tmp_path):
    root = tmp_path / "mirror"
    shutil.copytree(tiny_model, root / "355M")
    with ModelMirror(root) as mirror:
        model = gpt2.load("345M", str(tmp_path / "models"), base_url=mirror.url)
    assert (tmp_path / "models" / "355M" / "model.ckpt.index").exists()
    assert model.hparams.n_ctx == 128


class TestTextStream:
    @pytest.fixture(scope="class")
    def encoder(self, tiny_model):
        return read_encoder(tiny_model)

    def test_holds_back_what_may_start_a_stop_string(self, encoder):
        stream = TextStream(encoder, stop="END")
        shown = [stream.feed(encoder.encode(part)) for part in ["the mill E", "N", "D and more"]]
        assert shown == ["the mill ", "", ""]
        assert stream.finished and stream.text == "the mill "

    def test_releases_a_false_alarm(self, encoder):
        stream = TextStream(encoder, stop="END")
        assert stream.feed(encoder.encode("the E")) == "the "
        assert stream.feed(encoder.encode("Nx")) == "ENx"
        assert stream.finish() == "the ENx"

    def test_stop_token_ends_the_text(self, encoder):
        stream = TextStream(encoder, stop_token=encoder.eot_token)
        tokens = encoder.encode("the mill") + [encoder.eot_token] + encoder.encode("after")
        assert stream.feed(np.array(tokens)) == "the mill"
        assert stream.finished and stream.feed(encoder.encode("more")) == ""
