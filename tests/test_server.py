"""The completions server (serve.py), driven over HTTP as its users drive it: the official `openai`
client, plain HTTP for what the client never sends, and signals. Each server is a real process,
started once per module on factory models."""
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest

import gpt2
from gpt2.testing import make_model_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Served:
    """A serve.py process and its address; its stderr lines are kept in `lines`."""

    def __init__(self, models_dir, *flags, model="long", launcher=()):
        self.process = subprocess.Popen([sys.executable, *launcher, os.path.join(ROOT, "serve.py"), "--model_name", model,
                                         "--models_dir", str(models_dir), "--port", "0", *flags],
                                        stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.lines, ready = [], threading.Event()

        def read():
            for line in self.process.stderr:
                self.lines.append(line)
                if line.startswith("ready: "):
                    self.url = line.split(" on ")[1].split("/v1/")[0]
                    ready.set()
            ready.set()
        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(300) or self.process.poll() is not None:
            self.process.kill()
            raise AssertionError("the server did not start:\n" + "".join(self.lines))
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def post(self, path, body, **kwargs):
        return self.http.post(path, content=json.dumps(body) if not isinstance(body, bytes) else body, **kwargs)

    def metric(self, name, **kwargs):
        for line in self.http.get("/metrics", **kwargs).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def models_dir(tiny_model):
    """models/long: a context of 1024 tokens and wider than the tiny model, so that a request can take a
    while (a few seconds for 1000 tokens)."""
    make_model_folder(tiny_model.parent / "long", n_ctx=1024, n_embd=256, n_layer=4)
    return tiny_model.parent


@pytest.fixture(scope="module")
def server(models_dir):
    served = Served(models_dir, "--max_batch", "4")
    yield served
    served.stop()


@pytest.fixture(scope="module")
def model(models_dir):
    return gpt2.GPT2.from_folder(models_dir / "long")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", _strict_response_validation=True)


def streamed(server, body):
    """The server-sent events of a streamed request, as JSON (and the final "[DONE]" as a str)."""
    events = []
    with server.http.stream("POST", "/v1/completions", content=json.dumps({**body, "stream": True})) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_a_completion_with_n_and_logprobs_is_what_generate_gives(client, model):
    response = client.completions.create(model="long", prompt="The river", max_tokens=20, seed=7, n=2, logprobs=3,
                                         extra_body={"top_k": 40})
    samples = model.generate("The river", 20, seed=7, nsamples=2, top_k=40, logprobs=3)
    assert response.object == "text_completion" and response.model == "long"
    assert [c.index for c in response.choices] == [0, 1]
    for choice, sample in zip(response.choices, samples):
        assert choice.text == sample.text
        assert choice.logprobs.tokens == [token_name(model, t) for t in sample.tokens]
        np.testing.assert_allclose(choice.logprobs.token_logprobs, sample.logprobs, rtol=0, atol=1e-5)
        # Equal to float32 precision: the server's batch has another number of rows than generate's.
        assert choice.logprobs.top_logprobs == [{token_name(model, t): pytest.approx(v, abs=1e-5) for t, v in top}
                                                for top in sample.top_logprobs]
        assert choice.logprobs.text_offset == sorted(choice.logprobs.text_offset)
        assert choice.finish_reason == ("stop" if len(sample.tokens) < 20 else "length")
    assert response.usage.prompt_tokens == len(model.encode("The river"))
    assert response.usage.completion_tokens >= sum(len(s.tokens) for s in samples)


def token_name(model, token):
    """A token as OpenAI's logprobs show it: its text, or its bytes where it is part of a character."""
    raw = model.encoder.decode_bytes([token])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def test_echo_with_no_new_tokens_scores_the_prompt_as_model_score(client, model):
    text = "The river ran past the old mill, and the miller's children ran beside it."
    response = client.completions.create(model="long", prompt=text, max_tokens=0, echo=True, logprobs=2)
    [choice] = response.choices
    score = model.score(text)
    assert choice.text == text and choice.finish_reason == "length"
    np.testing.assert_allclose(choice.logprobs.token_logprobs, score.logprobs, rtol=1e-5, atol=1e-6)
    assert len(choice.logprobs.tokens) == len(score.tokens)
    # The likeliest tokens come first, and a token that is its place's likeliest is among them with its own log-probability.
    for logprob, top in zip(choice.logprobs.token_logprobs, choice.logprobs.top_logprobs):
        values = list(top.values())
        assert values == sorted(values, reverse=True) and logprob <= values[0] + 1e-5


def test_a_stream_sends_the_text_generate_gives_then_usage_and_done(server, model):
    body = {"prompt": ["The river", "In the town"], "max_tokens": 30, "seed": 3, "temperature": 0.8, "top_p": 0.9,
            "stream_options": {"include_usage": True}}
    events = streamed(server, body)
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] > 0
    texts, finished = ["", ""], []
    for event in events[:-2]:
        [choice] = event["choices"]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            finished.append(choice["index"])
    assert sorted(finished) == [0, 1]  # one final chunk per choice
    assert texts == [s[0] for s in model.generate(["The river", "In the town"], 30, seed=3, temperature=0.8,
                                                  top_p=0.9)]


def test_concurrent_requests_each_get_what_generate_gives_alone(server, model):
    """Eight requests with other prompts, lengths, seeds and flags on four rows, arriving while
    others run: each choice is a row whose tokens are its own."""
    cases = [
        ("The river", 40, dict(seed=1)),
        ("In the town there was a market on Saturdays.", 25, dict(seed=2, top_k=40)),
        ("", 60, dict(seed=3, top_p=0.9, temperature=0.7)),
        ("One, two, three", 35, dict(seed=4, repetition_penalty=1.3, presence_penalty=0.5)),
        ("def greet(name):", 50, dict(seed=5, temperature=0, no_repeat_ngram_size=2)),
        ("The bookseller kept a list", 20, dict(seed=6, frequency_penalty=1.0, min_p=0.05, stop=["e "])),
        ("Numbers: 0 1 2 3", 45, dict(seed=7, logit_bias={"5": 5.0}, bad_words=["the"])),
        ("When the evening came,", 30, dict(seed=8, top_k=5, ignore_eos=True)),
    ]

    def send(i):
        prompt, length, flags = cases[i]
        time.sleep(0.05 * i)  # later ones arrive while earlier ones run
        response = server.post("/v1/completions", {"prompt": prompt, "max_tokens": length, **flags})
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        texts = list(pool.map(send, range(len(cases))))
    for (prompt, length, flags), text in zip(cases, texts):
        flags = dict(flags)
        if flags.pop("ignore_eos", False):
            flags["ignore_eot"] = True
        flags["logit_bias"] = {int(k): v for k, v in flags.get("logit_bias", {}).items()} or None
        assert text == model.generate(prompt, length, **flags)[0], (prompt, flags)


def test_a_short_request_finishes_while_a_long_one_runs(server):
    """Continuous batching: the short request joins the running batch instead of waiting for it to end."""
    finished = {}

    def long():
        events = streamed(server, {"prompt": "The river", "max_tokens": 1000, "ignore_eos": True, "seed": 1})
        finished["long"] = time.monotonic()
        return events

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(long)
        while server.metric("gpt2_rows_in_use") < 1:
            time.sleep(0.01)
        response = server.post("/v1/completions", {"prompt": "A", "max_tokens": 5, "ignore_eos": True})
        finished["short"] = time.monotonic()
        events = running.result()
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 5
    assert finished["short"] < finished["long"]
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_a_stop_string_across_tokens_is_never_sent(server, model):
    sample = model.generate("The river", 40, seed=11, ignore_eot=True, logprobs=0)[0]
    pieces = [model.decode([t]) for t in sample.tokens]
    # A stop string made of one token's last character and the next one's first.
    at = next(i for i in range(5, len(pieces) - 1) if pieces[i] and pieces[i + 1] and "\ufffd" not in pieces[i] +
              pieces[i + 1])
    stop = pieces[at][-1] + pieces[at + 1][0]
    events = streamed(server, {"prompt": "The river", "max_tokens": 40, "seed": 11, "ignore_eos": True,
                               "stop": [stop]})
    text = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert stop not in text
    assert text == model.generate("The river", 40, seed=11, ignore_eot=True, stop=stop)[0]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_frees_its_row(server, stream):
    before = server.metric("gpt2_generation_tokens_total")
    body = json.dumps({"prompt": "The river", "max_tokens": 1000, "ignore_eos": True, "stream": stream}).encode()
    host, port = server.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port))) as client:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        while server.metric("gpt2_rows_in_use") < 1:  # it runs; then the client leaves
            time.sleep(0.01)
    deadline = time.monotonic() + 30
    while server.metric("gpt2_rows_in_use") > 0:
        assert time.monotonic() < deadline, "the row was not freed"
        time.sleep(0.01)
    assert server.metric("gpt2_requests_running") == 0
    assert server.metric("gpt2_generation_tokens_total") - before < 1000  # freed long before its end


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ({"prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "max_tokens": 1025}, 400, "max_tokens"),
    ({"prompt": [5] * 1000, "max_tokens": 100}, 400, "max_tokens"),
    ({"prompt": [100000]}, 400, "prompt"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "x" * 2_000_000}, 413, None),
])
def test_bad_requests_get_an_error_in_openais_shape(server, body, status, param):
    response = server.post("/v1/completions", body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["param"] == param


def test_a_too_long_prompt_says_how_many_tokens_are_left(server):
    error = server.post("/v1/completions", {"prompt": [5] * 1000, "max_tokens": 100}).json()["error"]
    assert "leaves room for 25 new ones" in error["message"] and error["code"] == "context_length_exceeded"


def test_models_health_tokenize_and_detokenize(server, model):
    assert server.http.get("/health").json() == {"status": "ok"}
    [entry] = server.http.get("/v1/models").json()["data"]
    assert entry["id"] == "long" and entry["object"] == "model"
    tokens = server.post("/tokenize", {"prompt": "The river ran"}).json()
    assert tokens["tokens"] == model.encode("The river ran") and tokens["count"] == len(tokens["tokens"])
    assert server.post("/detokenize", {"tokens": tokens["tokens"]}).json() == {"prompt": "The river ran"}
    assert server.http.get("/nowhere").status_code == 404


def test_metrics_count_tokens_and_time_the_first_one(server):
    before = server.metric("gpt2_generation_tokens_total")
    server.post("/v1/completions", {"prompt": "The river", "max_tokens": 7, "ignore_eos": True})
    assert server.metric("gpt2_generation_tokens_total") == before + 7
    assert server.metric('gpt2_choices_finished_total{finish_reason="length"}') >= 1
    assert server.metric("gpt2_time_to_first_token_seconds_count") >= 1
    assert server.metric("gpt2_rows") == 4


@pytest.fixture(scope="module")
def small_server(models_dir):
    """One row, one waiting request, and a key."""
    served = Served(models_dir, "--max_batch", "1", "--max_queue", "1", "--api_key", "sesame", "--drain_seconds", "60")
    yield served
    served.stop()


KEY = {"Authorization": "Bearer sesame"}


def test_without_the_key_a_request_is_401_but_health_answers(small_server):
    response = small_server.post("/v1/completions", {"prompt": "x"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert small_server.post("/v1/completions", {"prompt": "x"}, headers={"Authorization": "Bearer no"}).status_code \
        == 401
    assert small_server.http.get("/health").status_code == 200
    assert small_server.post("/v1/completions", {"prompt": "x", "max_tokens": 2}, headers=KEY).status_code == 200


def test_a_full_queue_answers_429_and_sigterm_lets_running_requests_finish(small_server):
    long = {"prompt": "The river", "max_tokens": 600, "ignore_eos": True, "stream": True}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(lambda: streamed_with_key(small_server, long))
        while small_server.metric("gpt2_rows_in_use", headers=KEY) < 1:
            time.sleep(0.01)
        waiting = pool.submit(lambda: small_server.post("/v1/completions", {"prompt": "A", "max_tokens": 3},
                                                        headers=KEY))
        while small_server.metric("gpt2_requests_waiting", headers=KEY) < 1:
            time.sleep(0.01)
        refused = small_server.post("/v1/completions", {"prompt": "B", "max_tokens": 3}, headers=KEY)
        assert refused.status_code == 429 and refused.headers["Retry-After"]
        assert refused.json()["error"]["code"] == "queue_full"
        assert small_server.metric('gpt2_requests_rejected_total{status="429"}', headers=KEY) == 1
        small_server.process.send_signal(signal.SIGTERM)
        events = running.result()
        assert waiting.result().status_code == 200
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert len("".join(e["choices"][0]["text"] for e in events[:-1])) > 0
    assert small_server.process.wait(60) == 0
    assert small_server.lines[-1] == "gpt2-serve: stopped (SIGTERM)\n"


def streamed_with_key(server, body):
    events = []
    with server.http.stream("POST", "/v1/completions", content=json.dumps(body), headers=KEY) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_int8_serves_concurrent_requests_as_generate_makes_them_without_tensorflow(models_dir):
    model = gpt2.GPT2.from_folder(models_dir / "tiny", "int8")  # stores its programs: the server runs them
    served = Served(models_dir, "--max_batch", "2", "--dtype", "int8", model="tiny",
                    launcher=[os.path.join(ROOT, "tests", "without_tensorflow.py")])
    try:
        cases = [("The river", 30, dict(seed=1, top_k=40)), ("In the town", 20, dict(seed=2, top_p=0.9)),
                 ("", 25, dict(seed=3, temperature=0)), ("One, two", 15, dict(seed=4, repetition_penalty=1.2))]
        with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
            texts = list(pool.map(lambda case: served.post("/v1/completions", {
                "prompt": case[0], "max_tokens": case[1], **case[2]}).json()["choices"][0]["text"], cases))
        for (prompt, length, flags), text in zip(cases, texts):
            assert text == model.generate(prompt, length, **flags)[0]
    finally:
        served.stop()


@pytest.mark.parametrize("flags, message", [
    (["--max_batch", "0"], "error: --max_batch must be a whole number of at least 1, not 0"),
    (["--port", "70000"], "error: --port must be a TCP port, a whole number from 0 to 65535, not 70000"),
    (["--model_name", "no/such/model"], "error: unknown model 'no/such/model': use one of 124M, 355M, 774M, 1558M, the "
                                          "name of a model folder in"),
    (["--max_bach", "4"], "error: unknown flag --max_bach: did you mean --max_batch?"),
])
def test_bad_flags_are_one_line_before_anything_loads(models_dir, flags, message):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), "--models_dir", str(models_dir),
                             "--model_name", "long", *flags], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1 and result.stderr.startswith(message) and len(result.stderr.splitlines()) == 1


def test_a_port_in_use_is_one_line(models_dir, server):
    port = server.url.rsplit(":", 1)[1]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), "--models_dir", str(models_dir),
                             "--model_name", "long", "--port", port], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr == (f"error: cannot listen on 127.0.0.1:{port} (Address already "
                                                        "in use): pick another --port or --host\n")
