"""gpt2-serve: GPT-2 over HTTP, in the shape of OpenAI's completions API.

    python serve.py --model_name 124M          # http://127.0.0.1:8000/v1/completions

A request's life, in `completions` below: its JSON is read and checked (`parse_completion`: any
field it cannot honour is a 400 that names it); its prompts become engine requests, one per choice
(`n` for each prompt); a gpt2.serving.Batcher gives them rows as rows free up, beside the
requests already running (continuous batching), and hands each step's tokens back; they become
text here (stop strings are cut across tokens, and text that could still begin one is held
back), sent as server-sent events while they come (`stream`) or as one response at the end. A
client that goes away, a stop string, or the request's deadline frees its rows at the next step.

`GET /` is a page to write with the model in a browser (gpt2/page/: plain HTML, CSS and
JavaScript, no build step) that talks to /v1/completions like any other client; the page is
public and asks for the API key itself.

The HTTP layer is Starlette on uvicorn (the ASGI server that runs it, with its graceful shutdown:
SIGTERM or Ctrl-C stop accepting, running requests finish for up to --drain_seconds), and
/metrics is prometheus_client's. The model loads in a thread after the port is open, so /health
answers 503 until the model has loaded and compiled its first step.
"""
import asyncio
import codecs
import contextlib
import functools
import json
import secrets
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import List, NamedTuple, Optional

import numpy as np
import prometheus_client
from starlette.applications import Starlette
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .arguments import ArgumentError, check_controls, is_real, is_whole, new_seed
from .encoder import TextStream
from .engine import Request, Settings
from .errors import GPT2Error
from .serving import Batcher, Busy, Closed, Job


class ServerSettings(NamedTuple):
    """The server's flags (see docs/server.md)."""
    model_name: str
    max_batch: int = 8  # engine rows: requests' choices decoded at once
    max_queue: int = 64  # requests waiting for rows before a 429
    max_body: int = 1_000_000  # bytes of a request's body
    timeout: float = 600.0  # seconds a request may run; it then ends with what it has
    api_key: Optional[str] = None  # needed as "Authorization: Bearer KEY" when set
    step_seconds: float = 0.25  # about how long one call of the engine's step lasts


# Fields of OpenAI's completions request that the server takes, and those that llama.cpp and vLLM
# add (top_k, min_p, repetition_penalty, ignore_eos) and gpt2's other controls.
FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "logprobs",
          "echo", "stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "user", "best_of",
          "suffix", "top_k", "min_p", "repetition_penalty", "repeat_last_n", "no_repeat_ngram_size", "bad_words",
          "ignore_eos", "timeout"}
MAX_CHOICES = 128  # prompts x n in one request
PAGE = Path(__file__).with_name("page")  # the page's files, shipped in the package
# gpt2.arguments' names for the request's fields, in its messages.
ARGUMENT_NAMES = {"length": "max_tokens"}


class APIError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(self, status, message, param=None, code=None, type="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self):
        return JSONResponse(self.body(), self.status, headers=self.headers)


def bad_value(error):
    """A gpt2.arguments ArgumentError as a 400 that names the request's field."""
    message = error.template
    for name in error.names:
        message = message.replace("{" + name + "}", ARGUMENT_NAMES.get(name, name))
    return APIError(400, message, ARGUMENT_NAMES.get(error.names[0], error.names[0]) if error.names else None)


class Completion(NamedTuple):
    """A checked completions request."""
    prompts: List[list]  # each prompt's tokens, as given ([] for the empty string)
    n: int
    max_tokens: int
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: Optional[int]
    stop: List[str]
    settings: Settings  # each choice's, but for its sample number
    timeout: float


def parse_completion(body, model, settings):
    """The Completion that the JSON `body` asks of `model`; an APIError where it cannot be served."""
    if not isinstance(body, dict):
        raise APIError(400, "the request's body must be a JSON object")
    for field in body:
        if field not in FIELDS:
            raise APIError(400, f"unknown field {field!r}: this server takes {', '.join(sorted(FIELDS))}", field)
    get = body.get
    if get("model") not in (None, settings.model_name):
        raise APIError(404, f"the model {get('model')!r} does not exist: this server serves "
                            f"{settings.model_name!r}", "model", "model_not_found")
    if get("suffix") not in (None, ""):
        raise APIError(400, "suffix is not supported: GPT-2 only continues text", "suffix")
    n = field_value(body, "n", 1, is_whole, "a whole number of at least 1", lambda v: v >= 1)
    if get("best_of") not in (None, n):
        raise APIError(400, "best_of must equal n: every choice made is returned", "best_of")
    max_tokens = field_value(body, "max_tokens", 16, is_whole, "a whole number >= 0", lambda v: v >= 0)
    stream = field_value(body, "stream", False, lambda v: isinstance(v, bool), "true or false")
    echo = field_value(body, "echo", False, lambda v: isinstance(v, bool), "true or false")
    ignore_eos = field_value(body, "ignore_eos", False, lambda v: isinstance(v, bool), "true or false")
    include_usage = stream_usage(get("stream_options"), stream)
    timeout = min(field_value(body, "timeout", settings.timeout, is_real, "a number of seconds > 0",
                              lambda v: v > 0), settings.timeout)
    if get("user") is not None and not isinstance(get("user"), str):
        raise APIError(400, "user must be a string", "user")
    if isinstance(get("stop"), list) and len(get("stop")) > 4:
        raise APIError(400, "stop takes at most 4 strings", "stop")
    prompts = parse_prompts(get("prompt"), model)
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(400, f"{len(prompts)} prompts with n {n} make {len(prompts) * n} choices; "
                            f"a request may have at most {MAX_CHOICES}", "n")
    defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": None}
    flags = {name: defaults[name] if get(name) is None else get(name) for name in defaults}
    try:
        controls = check_controls(**{name: get(name) for name in (
            "min_p", "repetition_penalty", "repeat_last_n", "presence_penalty", "frequency_penalty",
            "no_repeat_ngram_size", "logit_bias", "bad_words", "logprobs") if get(name) is not None})
        sampling = model.sampling_flags(None, flags["temperature"], flags["top_k"], flags["top_p"], flags["seed"], 0,
                                        get("stop"), controls)
    except ArgumentError as e:
        raise bad_value(e) from None
    for tokens in prompts:
        n_ctx, used = model.hparams.n_ctx, max(len(tokens), 1)
        if used + max_tokens > n_ctx + 1:
            raise APIError(400, f"this model's context is {n_ctx} tokens, and a prompt of {used} tokens leaves room "
                                f"for {max(n_ctx + 1 - used, 0)} new ones, but max_tokens is {max_tokens}: shorten "
                                "the prompt or lower max_tokens", "max_tokens", "context_length_exceeded")
    if echo and controls.logprobs is not None and model.int8:
        raise APIError(400, "echo with logprobs scores the prompt, which needs the model's float weights: start the "
                            "server with --dtype float32", "echo")
    return Completion(prompts, n, max_tokens, stream, include_usage, echo, controls.logprobs, sampling["stop"],
                      model.settings(sampling, 0, ignore_eos), timeout)


def field_value(body, name, default, kind, requirement, within=lambda v: True):
    value = body.get(name)
    if value is None:
        return default
    if not kind(value) or not within(value):
        raise APIError(400, f"{name} must be {requirement}, not {json.dumps(value)}", name)
    return value


def stream_usage(options, stream):
    """Whether a stream ends with a usage chunk (stream_options.include_usage)."""
    if options is None:
        return False
    if not stream:
        raise APIError(400, "stream_options is only allowed with stream true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"} or \
            not isinstance(options.get("include_usage", False), bool):
        raise APIError(400, "stream_options must be {\"include_usage\": true or false}", "stream_options")
    return options.get("include_usage", False)


def parse_prompts(prompt, model):
    """The prompts' tokens: `prompt` is a string, a list of strings, a list of token ids or a list of such lists."""
    n_vocab = model.hparams.n_vocab

    def token_list(value):
        if not value:
            raise APIError(400, "a prompt of token ids must have at least one", "prompt")
        if not all(is_whole(t) and 0 <= t < n_vocab for t in value):
            raise APIError(400, f"token ids in prompt must be whole numbers from 0 to {n_vocab - 1}", "prompt")
        return [int(t) for t in value]

    if prompt is None:
        return [[]]  # OpenAI's default: <|endoftext|> alone
    if isinstance(prompt, str):
        return [model.encode(prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [model.encode(p) for p in prompt]
        if all(is_whole(t) for t in prompt):
            return [token_list(prompt)]
        if all(isinstance(p, list) for p in prompt):
            return [token_list(p) for p in prompt]
    raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of such lists",
                   "prompt")


@functools.lru_cache(maxsize=None)
def token_string(encoder, token):
    """A token as OpenAI's logprobs name it: its text, or "bytes:\\xe2\\x80" where it is part of a character."""
    raw = encoder.decode_bytes([token])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class Entry(NamedTuple):
    """A token of a choice's text, for its logprobs."""
    token: int
    offset: int  # characters of the text before it
    logprob: float
    top: list  # its place's most likely tokens: (token, log-probability)


def logprobs_object(encoder, entries, n, start=0):
    """OpenAI's logprobs object for these entries: each token with its log-probability and its
    place's n likeliest tokens; offsets count from `start`."""
    return {"tokens": [token_string(encoder, e.token) for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token_string(encoder, t): v for t, v in e.top[:n]} for e in entries],
            "text_offset": [start + e.offset for e in entries]}


def character_offsets(encoder, tokens, utf8=None):
    """Each token's offset in the characters of their text (a token that starts inside a character
    gets that character's); and the characters of the whole characters in all. `utf8`: the
    incremental decoder to go on with (for tokens that come in parts)."""
    utf8 = utf8 or codecs.getincrementaldecoder("utf-8")(errors="replace")
    offsets, chars = [], 0
    for token in tokens:
        offsets.append(chars)
        chars += len(utf8.decode(encoder.decode_bytes([token])))
    return offsets, chars


class ChoiceText:
    """One choice's text as its tokens arrive, and its tokens' log-probabilities.

    `feed` returns the text that is now sure (gpt2.api.TextStream: whole characters, none of a
    stop string or of what could begin one) and the Entries of the tokens that start within it; a
    token that starts after a stop string is never returned. Offsets count the characters of the
    new text (the server adds the echoed prompt's).
    """

    def __init__(self, encoder, stop, stop_token):
        self.encoder, self.stop_token = encoder, stop_token
        self.text = TextStream(encoder, stop, stop_token)
        self.shown = 0  # characters returned so far
        self.chars = 0  # whole characters of the tokens so far: the next token's offset
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.entries = []  # not returned yet
        self.n_tokens = 0  # tokens the model made for it, its stop token included
        self.finish_reason = None

    def feed(self, event):
        """(text, entries) for a gpt2.serving.Event of this choice."""
        tokens = [int(t) for t in event.tokens]
        self.n_tokens += len(tokens)
        if self.stop_token in tokens:
            kept = tokens[:tokens.index(self.stop_token)]
        else:
            kept = tokens
        offsets, chars = character_offsets(self.encoder, kept, self.utf8)
        for i, (token, offset) in enumerate(zip(kept, offsets)):
            logprobs = event.logprobs
            self.entries.append(Entry(token, self.chars + offset, *(
                (float(logprobs.chosen[i]), list(zip(logprobs.top_tokens[i].tolist(),
                                                     logprobs.top_logprobs[i].tolist()))) if logprobs else (None, []))))
        self.chars += chars
        piece = self.text.feed(tokens)
        if self.text.finished:  # its stop token, or a stop string
            self.finish_reason = "stop"
        elif event.finish_reason is not None:  # its tokens made (or its time up): what was held back is sure now
            piece += self.text.finish(pending_only=True)
            self.finish_reason = "length"
        self.shown += len(piece)
        ready = [e for e in self.entries if e.offset < self.shown]
        if self.finish_reason and len(self.text.text) >= self.chars:  # not cut by a stop string: every token
            ready = self.entries
        self.entries = [] if self.finish_reason else self.entries[len(ready):]
        return piece, ready


class Server:
    """The model, its batcher and its metrics, and the handlers of the HTTP routes."""

    def __init__(self, settings, load, on_ready=None, on_error=None):
        self.settings, self.load, self.on_ready, self.on_error = settings, load, on_ready, on_error
        self.model = self.batcher = None
        self.load_error = None  # the GPT2Error, where loading failed
        self.ready = threading.Event()
        self.scoring = threading.Lock()  # echo's scoring passes run one at a time, beside the batcher
        self.created = int(time.time())
        self.registry = prometheus_client.CollectorRegistry()
        self._metrics()

    def _metrics(self):
        r = self.registry
        gauge = functools.partial(prometheus_client.Gauge, registry=r)
        gauge("gpt2_requests_running", "Requests with a choice in a row").set_function(
            lambda: self.batcher.jobs_running() if self.batcher else 0)
        gauge("gpt2_requests_waiting", "Requests waiting for a row").set_function(
            lambda: self.batcher.jobs_waiting() if self.batcher else 0)
        gauge("gpt2_rows_in_use", "Engine rows decoding a choice").set_function(
            lambda: self.batcher.rows_in_use() if self.batcher else 0)
        gauge("gpt2_rows", "Engine rows (--max_batch)").set(self.settings.max_batch)
        self.prompt_tokens = prometheus_client.Counter("gpt2_prompt_tokens", "Prompt tokens of requests served",
                                                       registry=r)
        self.generation_tokens = prometheus_client.Counter("gpt2_generation_tokens", "Tokens generated", registry=r)
        self.finished = prometheus_client.Counter("gpt2_choices_finished", "Choices answered, by finish reason",
                                                  ["finish_reason"], registry=r)
        self.rejected = prometheus_client.Counter("gpt2_requests_rejected", "Requests refused, by HTTP status",
                                                  ["status"], registry=r)
        buckets = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 10, 30)
        self.first_token = prometheus_client.Histogram("gpt2_time_to_first_token_seconds", "From a request's "
                                                       "arrival to its first token", buckets=buckets, registry=r)
        self.between_tokens = prometheus_client.Histogram("gpt2_time_between_tokens_seconds", "Between a choice's "
                                                          "tokens (a step's several tokens share its time)",
                                                          buckets=buckets, registry=r)

    # Start and stop -------------------------------------------------------------------------

    def start(self):
        """Load the model and compile its first step, in a thread: /health is 503 until then."""
        def load():
            try:
                self.model = self.load()
                if not self.model.int8:  # int8 runs without TensorFlow
                    # Each new cache size traces the step again, by design (a few sizes): not worth TensorFlow's warning.
                    import tensorflow as tf
                    tf.get_logger().setLevel("ERROR")
                engine = self.model.engine(self.settings.max_batch)
                engine.admit([Request([self.model.encoder.eot_token], 2, Settings())])
                engine.step(2)  # compiles the loop (or reads it from the compilation cache)
                engine.release(0)
                self.batcher = Batcher(engine, max_queue=self.settings.max_queue,
                                       step_seconds=self.settings.step_seconds)
            except GPT2Error as e:
                self.load_error = e
            except BaseException as e:  # shown whole: nobody foresaw it
                traceback.print_exc(file=sys.stderr)
                self.load_error = GPT2Error(f"loading the model failed: {type(e).__name__}: {e}")
            self.ready.set()
            callback = self.on_error if self.load_error else self.on_ready
            if callback:
                callback()
        threading.Thread(target=load, name="gpt2-load", daemon=True).start()

    def stop(self):
        if self.batcher is not None:
            self.batcher.close()

    def serving(self):
        return self.ready.is_set() and self.batcher is not None

    # Routes ---------------------------------------------------------------------------------

    def routes(self):
        # The page and its files need no key: they hold nothing but code, and the page asks for the key.
        return [Route("/", self.page), Mount("/page", StaticFiles(directory=PAGE)),
                Route("/health", self.health), Route("/metrics", self.metrics),
                Route("/v1/models", self.models), Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/tokenize", self.tokenize, methods=["POST"]),
                Route("/detokenize", self.detokenize, methods=["POST"])]

    async def page(self, request):
        return FileResponse(PAGE / "index.html")

    async def health(self, request):
        if self.serving():
            return JSONResponse({"status": "ok"})
        message = str(self.load_error or "the model is loading")
        return APIError(503, message, type="unavailable_error", code="loading" if not self.load_error else
                        "load_failed").response()

    async def metrics(self, request):
        self.check_key(request)
        return Response(prometheus_client.generate_latest(self.registry),
                        media_type=prometheus_client.CONTENT_TYPE_LATEST)

    async def models(self, request):
        self.check_key(request)
        n_ctx = self.model.hparams.n_ctx if self.model else None
        return JSONResponse({"object": "list", "data": [{"id": self.settings.model_name, "object": "model",
                                                         "created": self.created, "owned_by": "gpt2",
                                                         "max_model_len": n_ctx}]})

    async def tokenize(self, request):
        body = await self.read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str) or set(body) - {"prompt", "model"}:
            raise APIError(400, "tokenize takes {\"prompt\": text}", "prompt")
        tokens = self.model.encode(body["prompt"])
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": self.model.hparams.n_ctx})

    async def detokenize(self, request):
        body = await self.read_json(request)
        n_vocab = self.model.hparams.n_vocab
        if not isinstance(body, dict) or not isinstance(body.get("tokens"), list) or set(body) - {"tokens", "model"} \
                or not all(is_whole(t) and 0 <= t < n_vocab for t in body["tokens"]):
            raise APIError(400, f"detokenize takes {{\"tokens\": [token ids from 0 to {n_vocab - 1}]}}", "tokens")
        return JSONResponse({"prompt": self.model.decode(body["tokens"])})

    async def read_json(self, request):
        """The request's JSON body, once the key is checked and the model serves."""
        self.check_key(request)
        if not self.serving():
            raise APIError(503, str(self.load_error or "the model is loading: try again when /health answers 200"),
                           type="unavailable_error", code="loading")
        limit = self.settings.max_body
        too_large = APIError(413, f"the request's body is over {limit} bytes (--max_body)", code="body_too_large")
        if int(request.headers.get("content-length") or 0) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"the request's body is not JSON: {e}") from None

    def check_key(self, request):
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and secrets.compare_digest(given[len("Bearer "):].encode(), key.encode())):
            raise APIError(401, "a valid API key is needed: send it as \"Authorization: Bearer KEY\"",
                           type="authentication_error", code="invalid_api_key")

    # Completions ----------------------------------------------------------------------------

    async def completions(self, request):
        arrived = time.monotonic()
        completion = parse_completion(await self.read_json(request), self.model, self.settings)
        model, n = self.model, completion.n
        seed = completion.settings.seed
        seed = new_seed() if seed is None else seed  # one seed: the request's choices are its samples 0, 1, ...
        # The echoed prompts, with their tokens' Entries where logprobs are asked for too.
        echoes = [(model.decode(tokens), await self.prompt_entries(tokens, completion.logprobs))
                  if completion.echo else ("", []) for tokens in completion.prompts]
        choices = [ChoiceText(model.encoder, completion.stop, completion.settings.stop_token)
                   for _ in range(len(completion.prompts) * n)]
        requests = [Request(tokens or [model.encoder.eot_token], completion.max_tokens,
                            completion.settings._replace(seed=seed, sample=i * n + j))
                    for i, tokens in enumerate(completion.prompts) for j in range(n)]
        events = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def deliver(event):  # from the batcher's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop has closed: nobody is listening
                job.finish()

        job = Job(requests, deliver, arrived + completion.timeout)
        if completion.max_tokens:
            try:
                self.batcher.submit(job)
            except Busy as e:
                raise APIError(429, f"the server is busy: {e}; try again shortly", type="rate_limit_error",
                               code="queue_full", headers={"Retry-After": "1"}) from None
            except Closed as e:
                raise APIError(503, str(e), type="unavailable_error", code="shutting_down") from None
        prompt_tokens = sum(len(tokens) or 1 for tokens in completion.prompts)
        self.prompt_tokens.inc(prompt_tokens)
        header = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                  "model": self.settings.model_name}

        def logprobs(entries, start):
            """The logprobs object of these entries, their offsets counted from `start`; None where not asked for."""
            if completion.logprobs is None:
                return None
            return logprobs_object(model.encoder, entries, completion.logprobs, start)

        async def pieces():
            """(choice index, text, logprobs or None, finish_reason or None) as the choices' tokens come."""
            for index in range(len(choices)):
                if completion.echo:
                    text, entries = echoes[index // n]
                    yield index, text, logprobs(entries, 0), None
            if not completion.max_tokens:
                for index, choice in enumerate(choices):
                    choice.finish_reason = "length"
                    yield index, "", logprobs([], len(echoes[index // n][0])), "length"
                return
            last = [None] * len(choices)  # when each choice's latest tokens came
            while not all(choice.finish_reason for choice in choices):
                event = await events.get()
                if event.error:
                    raise APIError(500, event.error, type="server_error", code="model_failed")
                choice, now = choices[event.index], time.monotonic()
                if len(event.tokens):
                    self.generation_tokens.inc(len(event.tokens))
                    if last[event.index] is None:
                        self.first_token.observe(now - arrived)
                    else:
                        for _ in event.tokens:
                            self.between_tokens.observe((now - last[event.index]) / len(event.tokens))
                    last[event.index] = now
                if choice.finish_reason is not None:  # stopped at a string already: its row is being freed
                    continue
                text, entries = choice.feed(event)
                if choice.finish_reason is not None:
                    self.finished.labels(choice.finish_reason).inc()
                    job.finish(event.index)  # ended, or stopped at a string: free its row now
                    self.batcher.wake()
                if text or entries or choice.finish_reason:
                    yield event.index, text, logprobs(entries, len(echoes[event.index // n][0])), choice.finish_reason

        def usage():
            made = sum(choice.n_tokens for choice in choices)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": made, "total_tokens": prompt_tokens + made}

        def done():  # the response is complete, or the client went away
            job.finish()
            if self.batcher:
                self.batcher.wake()

        if completion.stream:
            async def stream():
                try:
                    async for index, text, piece_logprobs, finish_reason in pieces():
                        yield sse({**header, "choices": [{"index": index, "text": text, "logprobs": piece_logprobs,
                                                          "finish_reason": finish_reason}]})
                    if completion.include_usage:
                        yield sse({**header, "choices": [], "usage": usage()})
                    yield "data: [DONE]\n\n"
                except APIError as e:  # the status line went out already: the error is the stream's last event
                    yield sse(e.body())
                finally:  # Starlette cancels the stream when the client goes away
                    done()
            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        texts, parts = [""] * len(choices), [[] for _ in choices]
        watching = asyncio.create_task(self.watch_disconnect(request, job))
        try:
            async for index, text, piece_logprobs, _ in pieces():
                texts[index] += text
                parts[index].append(piece_logprobs)
        finally:
            watching.cancel()
            done()
        return JSONResponse({**header, "choices": [
            {"index": i, "text": texts[i], "finish_reason": choice.finish_reason,
             "logprobs": joined_logprobs(parts[i]) if completion.logprobs is not None else None}
            for i, choice in enumerate(choices)], "usage": usage()})

    async def watch_disconnect(self, request, job):
        """Finish `job` when the client of a (not streamed) request goes away."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.finish()
        self.batcher.wake()

    async def prompt_entries(self, tokens, n):
        """With logprobs (n alternatives): the Entries of a prompt's tokens, scored as model.score
        scores text (each token given <|endoftext|> and the tokens before it); else []."""
        if n is None or not tokens:
            return []
        from .score import score_tokens  # TensorFlow's: started by then, by the model's loading
        model = self.model

        def score():
            with self.scoring:
                return list(score_tokens(model.params, model.hparams, tokens, model.encoder.eot_token,
                                         stride=model.window_stride(None), top=n))
        scored = await asyncio.to_thread(score)
        offsets, _ = character_offsets(model.encoder, tokens)
        logprobs = np.concatenate([s.logprobs for s in scored])
        top_tokens = np.concatenate([s.top_tokens for s in scored]).tolist()
        top_logprobs = np.concatenate([s.top_logprobs for s in scored]).tolist()
        return [Entry(token, offset, float(logprob), list(zip(top_t, top_v))) for token, offset, logprob, top_t, top_v
                in zip(tokens, offsets, logprobs, top_tokens, top_logprobs)]


def joined_logprobs(parts):
    """One logprobs object from the parts a choice's text came in."""
    joined = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for part in parts:
        for key in joined:
            joined[key] += part[key]
    return joined


def sse(data):
    return f"data: {json.dumps(data)}\n\n"


def create_app(settings, load, on_ready=None, on_error=None):
    """The ASGI app that serves the model `load()` returns, loaded in a thread once the app starts;
    then on_ready() or, where loading failed, on_error() is called (app.state.server.load_error
    is the GPT2Error)."""
    server = Server(settings, load, on_ready, on_error)

    async def api_error(request, error):
        server.rejected.labels(str(error.status)).inc()
        return error.response()

    async def not_found(request, error):
        return APIError(error.status_code, f"{request.method} {request.url.path} is not served here: see / (the page), "
                        "/v1/models, /v1/completions, /health, /metrics, /tokenize, /detokenize",
                        code="not_found").response()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.start()
        yield
        await asyncio.to_thread(server.stop)

    app = Starlette(routes=server.routes(), lifespan=lifespan,
                    exception_handlers={APIError: api_error, 404: not_found, 405: not_found})
    app.state.server = server
    return app
