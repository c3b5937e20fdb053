#!/usr/bin/env python3
"""Latency and throughput of an OpenAI-compatible completions server under load, at several concurrencies.

    python benchmarks/serve.py                          # starts serve.py: 124M (random weights), float32
    python benchmarks/serve.py --dtype int8 --flags top_k=40
    python benchmarks/serve.py --max_concurrency 8 --offline   # and model.generate's batch-8 rate beside it
    python benchmarks/serve.py --max_concurrency 1 --prompt_tokens 32   # first-token latency of a 32-token prompt
    python benchmarks/serve.py --request_rate 2         # requests arrive at random, 2 a second on average
    python benchmarks/serve.py --url http://127.0.0.1:8000     # a server that is already running
    python benchmarks/serve.py --tiny                   # a tiny model and short runs: checks the script

By default it starts the server itself, `python serve.py --model_name ... --models_dir ... --dtype
... --max_batch ... --port <a free port>` from the repository's root, waits until its /health
answers 200 (503 means loading or compiling), and stops it with SIGTERM at the end; the server's
output goes to a log file, shown if it fails. With --url it uses a server that is running (one
whose /health is missing counts as ready). The model folder (random weights of the real shapes,
as benchmarks/generate.py makes them) is made in --models_dir if it is missing; with --url it is
still read, for its vocabulary and context size.

For each --max_concurrency level it sends --num_prompts streaming requests (default: 4 per
level of concurrency, at least 16), at most that many in flight: as one ends the next starts.
With a finite --request_rate the requests also arrive as a Poisson process (exponential gaps,
seeded by --seed), still at most max_concurrency at a time. Every request asks for --max_tokens
tokens with `ignore_eos: true` (so it makes exactly that many), `stream: true` with
`stream_options: {"include_usage": true}`, `seed` (--seed plus the request's number) and the
--flags: greedy (temperature 0), top_k=40 or top_p=0.9 (temperature 1), as FLAG_SETS in
benchmarks/generate.py; the other filter is sent switched off (top_k 0, top_p 1).

Prompts: random runs of the words that are one token each in the model folder's vocabulary
(" the", " book", ...), so that a prompt of n words is exactly n tokens; their lengths are drawn
(seeded) from --min_prompt_tokens to --max_prompt_tokens, at most the context less --max_tokens,
or all --prompt_tokens long. They are sent as lists of token ids, or with --text_prompts as text
(exactly as many tokens for a server whose vocabulary is the folder's, such as a GGUF file
converted from it; the prompt tokens counted are then the server's, from its usage chunk, where
it sends one). Every level sends the first requests of the same list.

Warm-up: before the timed runs, untimed requests for each cache size the prompts need (prompt
and new tokens less one, as the engine lays its cache out: the last new token is never fed back;
rounded up as gpt2.engine.bucket rounds it), the longest prompt of each, sent 1, 2, 4, ... at a
time up to the highest level: the server compiles its decoding loop the first time it meets a
cache size with a number of rows in use (rounded up to a power of two), some seconds each, and
that must not land in a timed run.

What is measured, per request, as vLLM's `vllm bench serve` measures it (times from the client's
clock, time.perf_counter, from the moment the request is sent; a request waiting for its turn
under --max_concurrency is not sent yet, while one waiting in the server's queue is):
    TTFT      time to first token: until the first event whose choices[0].text is not empty.
    ITL       inter-token latencies: the gap between each two successive events with text. The
              server may put several tokens in one event (ours makes a few tokens a step): as in
              vLLM, such an event counts one gap, not one per token, so ITL is the time between
              the pieces of text a user sees, and TPOT is the per-token figure.
    latency   end-to-end: until the response has ended (after its `data: [DONE]`). vLLM stops at
              its last event with choices; the usage event and [DONE] follow at once.
    output tokens   usage.completion_tokens from the usage event (without one: the events with
              text, which is right for a server that sends one token an event).
    TPOT      time per output token after the first: (latency - TTFT) / (output tokens - 1).
Per level (failed requests are left out of every number but the failure count):
    duration s        from the first request sent to the last response ended, so it counts
                      the ramp-down at the end, when fewer requests than the level are in flight
    requests/s        successful requests / duration
    output tokens/s   all successful requests' output tokens / duration
    total tokens/s    their prompt and output tokens / duration
    TTFT p50 / p99, TPOT p50    over the successful requests; ITL p50 / p99 over all their gaps
                      (NumPy's percentiles, linear between the two nearest values)
A request fails when its answer is not 200 (429: the server's queue is full), the stream carries
an error event, the connection fails, or no text comes at all. Each answer is also checked for the
shape the OpenAI API gives (usage tokens as asked and as sent, a finish_reason, `data: [DONE]`);
what is not is counted under the table.

--offline measures, for comparison, the same prompts (those of concurrency --offline_batch) with
the same flags and seed through `GPT2.from_folder(folder, dtype).generate(texts, length=max_tokens,
batch_size=--offline_batch, ignore_eot=True)`, in a process of its own and before the server
starts (with --url: while that server idles), one untimed call and then one timed: its output
tokens/s, and the server's at that concurrency as a fraction of it, are printed under the table.
The prompts are given as their text, which encodes to exactly the same tokens (see above).

Another server: --url, and --served_model NAME if it wants a "model" field. llama-cpp-python's
server (`python -m llama_cpp.server`) takes text prompts only (--text_prompts), sends no usage
while streaming and knows no ignore_eos; its defaults differ from OpenAI's (min_p 0.05, repeat
penalty 1.1, top_k 40): --extra_body '{"min_p": 0, "repeat_penalty": 1.0, "logit_bias": {"50256":
-100}}' sends neutral ones and keeps it from ending at <|endoftext|>.
"""
import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "src"))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from generate import FLAG_SETS as ENGINE_FLAG_SETS  # noqa: E402
from gpt2.arguments import GENERATION_DTYPES  # noqa: E402
from gpt2.engine import bucket  # noqa: E402  (NumPy's: no TensorFlow in this client)

FLAG_SETS = {name: ENGINE_FLAG_SETS[name] for name in ("greedy", "top_k=40", "top_p=0.9")}
HEALTH_POLL_SECONDS = 0.5


def processor():
    """This machine's processor: its name, its widest vector instructions and the cores this process may use."""
    name, flags = "unknown processor", set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    vectors = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name}, {vectors}, {len(os.sched_getaffinity(0))} cores"


# ---------------------------------------------------------------------------------------------
# Prompts


@dataclasses.dataclass
class Prompt:
    tokens: List[int]
    text: str  # encodes to exactly `tokens`


def one_token_words(encoder):
    """The ids of the tokens that are a space and lowercase letters and that encode back to themselves.

    GPT-2's pre-tokenizer cuts text before each " word", and each of these words is one whole
    token, so a run of n of them encodes to exactly those n tokens.
    """
    words = []
    for token in range(encoder.n_vocab):
        text = encoder.decode([token])
        if re.fullmatch(" [a-z]+", text) and encoder.encode(text) == [token]:
            words.append(token)
    return words


def make_prompts(encoder, count, lengths, seed):
    """`count` prompts of random one-token words, with lengths drawn from `lengths` (low, high)."""
    rng = np.random.default_rng(seed)
    words = one_token_words(encoder)
    prompts = []
    for length in rng.integers(lengths[0], lengths[1] + 1, count):
        tokens = [int(t) for t in rng.choice(words, length)]
        prompts.append(Prompt(tokens, encoder.decode(tokens)))
    wrong = [p for p in prompts if encoder.encode(p.text) != p.tokens]
    if wrong:  # the premise of one_token_words: cannot happen with GPT-2's pre-tokenizer
        sys.exit(f"a prompt's text does not encode to its tokens: {wrong[0].text[:80]!r}")
    return prompts


def warm_up_prompts(prompts, max_tokens, n_ctx):
    """The longest prompt of each cache size that the prompts need, from the smallest size up."""
    longest = {}
    for prompt in prompts:
        size = bucket(len(prompt.tokens) + max_tokens - 1, n_ctx)
        if size not in longest or len(prompt.tokens) > len(longest[size].tokens):
            longest[size] = prompt
    return [longest[size] for size in sorted(longest)]


# ---------------------------------------------------------------------------------------------
# The server


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path, lines=40):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def wait_until_ready(url, timeout, process=None, log_path=None):
    """Poll GET /health until it answers 200 (or 404: a server without it); exit with the server's output if it dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            sys.exit(f"the server exited with status {process.returncode} before it was ready; its last output "
                     f"({log_path}):\n{log_tail(log_path)}")
        try:
            status = httpx.get(f"{url}/health", timeout=5, trust_env=False).status_code
            if status in (200, 404):
                return
        except httpx.HTTPError:  # not listening yet
            pass
        time.sleep(HEALTH_POLL_SECONDS)
    output = f"; its last output ({log_path}):\n{log_tail(log_path)}" if log_path else ""
    sys.exit(f"the server at {url} was not ready after {timeout:.0f} s{output}")


@contextlib.contextmanager
def started_server(args):
    """serve.py running in a process of its own: yields its URL and command; SIGTERM at the end."""
    port = free_port()
    command = [sys.executable, "serve.py", "--model_name", args.model_name, "--models_dir", args.models_dir,
               "--dtype", args.dtype, "--host", "127.0.0.1", "--port", str(port), "--max_batch", str(args.max_batch),
               *shlex.split(args.server_args)]
    # A file, not a pipe: nobody reads a pipe while the benchmark runs, and a full one would stall the server.
    log = tempfile.NamedTemporaryFile("w", prefix="gpt2-serve-", suffix=".log", delete=False)
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    clean = False
    try:
        wait_until_ready(url, args.startup_timeout, process, log.name)
        yield url, command
        if process.poll() is not None:
            print(f"\nthe server exited (status {process.returncode}) during the benchmark; its last output "
                  f"({log.name}):\n{log_tail(log.name)}", file=sys.stderr)
        else:
            clean = True
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                print(f"the server did not stop within 60 s of SIGTERM: killed; its output is in {log.name}",
                      file=sys.stderr)
                process.kill()
                process.wait()
                clean = False
        log.close()
        if clean and process.returncode not in (0, -signal.SIGTERM):
            print(f"the server's exit status after SIGTERM was {process.returncode}; its last output ({log.name}):\n"
                  f"{log_tail(log.name)}", file=sys.stderr)
            clean = False
        if clean:
            os.remove(log.name)
        else:
            print(f"(the server's output is kept in {log.name})", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Requests


@dataclasses.dataclass
class Outcome:
    """One request, as the client saw it (seconds from when it was sent)."""
    prompt_tokens: int  # as sent; replaced by usage.prompt_tokens where the server reports it
    ok: bool = False
    status: Optional[int] = None
    error: str = ""
    ttft: Optional[float] = None
    itl: List[float] = dataclasses.field(default_factory=list)
    latency: Optional[float] = None
    output_tokens: int = 0
    text_events: int = 0
    problems: List[str] = dataclasses.field(default_factory=list)  # ways its answer is not OpenAI's shape


def request_body(args, prompt, number):
    body = {"prompt": prompt.text if args.text_prompts else prompt.tokens, "max_tokens": args.max_tokens,
            "temperature": 1.0, "top_k": 0, "top_p": 1.0, **FLAG_SETS[args.flags], "seed": args.seed + number,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if args.served_model:
        body["model"] = args.served_model
    return {**body, **args.extra_body}


def error_message(response):
    """An error answer's message: OpenAI's error.message, else the start of its body."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:200]
    retry = response.headers.get("retry-after")
    return f"HTTP {response.status_code}: {message}" + (f" (Retry-After: {retry})" if retry else "")


async def send(client, body, prompt_tokens, max_tokens):
    """Send one streaming completion request and time its events: an Outcome."""
    outcome = Outcome(prompt_tokens)
    usage = finish_reason = last_text_at = None
    done = False
    sent = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            outcome.status = response.status_code
            if response.status_code != 200:
                await response.aread()
                outcome.error = error_message(response)
                return outcome
            # Read to the body's end, past [DONE]: the connection then goes back to the pool.
            async for line in response.aiter_lines():
                if not line.startswith("data:"):  # the blank line after each event; ": comments"
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    done = True
                    continue
                event = json.loads(data)
                if event.get("error"):
                    error = event["error"]
                    outcome.error = f"error event: {error.get('message', error) if isinstance(error, dict) else error}"
                    return outcome
                if event.get("choices"):
                    choice = event["choices"][0]
                    finish_reason = choice.get("finish_reason") or finish_reason
                    if choice.get("text"):
                        now = time.perf_counter()
                        if last_text_at is None:
                            outcome.ttft = now - sent
                        else:
                            outcome.itl.append(now - last_text_at)
                        last_text_at = now
                        outcome.text_events += 1
                if event.get("usage"):
                    usage = event["usage"]
            outcome.latency = time.perf_counter() - sent
    except (httpx.HTTPError, ValueError) as e:  # ValueError: an event that is not JSON
        outcome.error = f"{type(e).__name__}: {e}"
        return outcome
    if last_text_at is None:
        outcome.error = "the stream had no text"
        return outcome
    outcome.ok = True
    if usage is None:
        outcome.problems.append("no usage event: output tokens counted as events with text")
        outcome.output_tokens = outcome.text_events
    else:
        outcome.output_tokens = usage.get("completion_tokens", outcome.text_events)
        if usage.get("completion_tokens") != max_tokens:
            outcome.problems.append(f"usage.completion_tokens is not max_tokens (got {usage.get('completion_tokens')})")
        if usage.get("prompt_tokens") != prompt_tokens:
            outcome.problems.append(f"usage.prompt_tokens is not the prompt's length (got {usage.get('prompt_tokens')} "
                                    f"for {prompt_tokens})")
        if usage.get("total_tokens") != (usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0):
            outcome.problems.append("usage.total_tokens is not prompt_tokens + completion_tokens")
        outcome.prompt_tokens = usage.get("prompt_tokens") or prompt_tokens
    if finish_reason != "length":
        outcome.problems.append(f"finish_reason is not 'length' (got {finish_reason!r})")
    if not done:
        outcome.problems.append("no 'data: [DONE]'")
    return outcome


async def run_level(client, args, prompts, concurrency):
    """Send the prompts, at most `concurrency` in flight, arriving at args.request_rate: (Outcomes, duration s)."""
    in_flight = asyncio.Semaphore(concurrency)
    arrivals = np.random.default_rng(args.seed)  # the same arrivals at every level

    async def limited(number, prompt):
        async with in_flight:
            return await send(client, request_body(args, prompt, number), len(prompt.tokens), args.max_tokens)

    start = time.perf_counter()
    tasks = []
    for number, prompt in enumerate(prompts):
        if number and math.isfinite(args.request_rate):  # a Poisson process: exponential gaps
            await asyncio.sleep(arrivals.exponential(1 / args.request_rate))
        tasks.append(asyncio.create_task(limited(number, prompt)))
    outcomes = await asyncio.gather(*tasks)
    return outcomes, time.perf_counter() - start


def percentile(values, q):
    return float(np.percentile(values, q)) if values else None


def summary(concurrency, outcomes, duration):
    """One level's numbers (times in ms), as the module's docstring defines them."""
    ok = [o for o in outcomes if o.ok]
    ttft = [o.ttft * 1e3 for o in ok]
    tpot = [(o.latency - o.ttft) / (o.output_tokens - 1) * 1e3 for o in ok if o.output_tokens > 1]
    itl = [gap * 1e3 for o in ok for gap in o.itl]
    latency = [o.latency * 1e3 for o in ok]
    output_tokens = sum(o.output_tokens for o in ok)
    prompt_tokens = sum(o.prompt_tokens for o in ok)
    numbers = {"concurrency": concurrency, "requests": len(outcomes), "failures": len(outcomes) - len(ok),
               "duration_s": duration, "request_throughput": len(ok) / duration,
               "output_tokens_per_s": output_tokens / duration,
               "total_tokens_per_s": (prompt_tokens + output_tokens) / duration,
               "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
               "tokens_per_text_event": output_tokens / max(1, sum(o.text_events for o in ok))}
    for name, values in (("ttft_ms", ttft), ("tpot_ms", tpot), ("itl_ms", itl), ("latency_ms", latency)):
        numbers[name] = {"mean": float(np.mean(values)) if values else None, "p50": percentile(values, 50),
                         "p90": percentile(values, 90), "p99": percentile(values, 99)}
    numbers["errors"] = dict(Counter(o.error for o in outcomes if not o.ok))
    numbers["problems"] = dict(Counter(problem for o in ok for problem in o.problems))
    numbers["outcomes"] = [dataclasses.asdict(o) for o in outcomes]
    return numbers


async def benchmark(url, args, prompts, n_ctx):
    """Warm the server up, then run each concurrency level: a summary per level."""
    levels = []
    biggest = max(args.max_concurrency)
    # trust_env=False: a proxy from the environment must not sit between the client and the server.
    limits = httpx.Limits(max_connections=biggest, max_keepalive_connections=biggest)
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=args.request_timeout, limits=limits) as client:
        warm_up = warm_up_prompts(prompts, args.max_tokens, n_ctx)
        # Our engine steps the rows in use, rounded up to a power of two, and compiles each such
        # width once per cache size: each prompt goes 1, 2, 4, ... at a time, up to the highest level.
        widths = [1 << i for i in range((biggest - 1).bit_length() + 1)]  # the powers of two up to biggest's
        print(f"warm-up: untimed requests, prompts of {', '.join(str(len(p.tokens)) for p in warm_up)} tokens, "
              f"{', '.join(map(str, widths))} at a time ...", end=" ", flush=True)
        start = time.perf_counter()
        for number, prompt in enumerate(warm_up):
            for width in widths:
                outcomes = await asyncio.gather(*(send(client, request_body(args, prompt, number), len(prompt.tokens),
                                                       args.max_tokens) for _ in range(width)))
                failed = [outcome for outcome in outcomes if not outcome.ok]
                if failed:
                    sys.exit(f"\nthe warm-up request failed: {failed[0].error}")
        print(f"{time.perf_counter() - start:.1f} s", flush=True)
        for concurrency in args.max_concurrency:
            outcomes, duration = await run_level(client, args, prompts[:num_prompts(args, concurrency)], concurrency)
            level = summary(concurrency, outcomes, duration)
            levels.append(level)
            print(f"concurrency {concurrency}: {level['requests']} requests, {level['failures']} failed, "
                  f"{duration:.1f} s, {level['output_tokens_per_s']:.1f} output tokens/s", flush=True)
    return levels


def num_prompts(args, concurrency):
    """Requests per level: --num_prompts, or 4 per request in flight (at least 16), so that the
    ramp-up and ramp-down are a small part of a level, yet a 124M float32 sweep takes minutes."""
    return args.num_prompts or max(16, 4 * concurrency)


# ---------------------------------------------------------------------------------------------
# The offline rate


def offline_worker(args):
    """Time model.generate on the prompts' texts (read from stdin); print a JSON line with the numbers."""
    from gpt2 import GPT2

    texts = json.load(sys.stdin)
    model = GPT2.from_folder(args.offline_worker, args.dtype)
    lengths = [len(model.encode(text)) for text in texts]

    def generate():
        model.generate(texts, length=args.max_tokens, batch_size=args.offline_batch, seed=args.seed, ignore_eot=True,
                       **FLAG_SETS[args.flags])

    generate()  # untimed: compiles the decoding loop for every cache size that the timed call meets
    start = time.perf_counter()
    generate()
    seconds = time.perf_counter() - start
    output_tokens = len(texts) * args.max_tokens  # ignore_eot: every sample is max_tokens long
    print(json.dumps({"seconds": seconds, "prompts": len(texts), "prompt_tokens": sum(lengths),
                      "output_tokens": output_tokens, "output_tokens_per_s": output_tokens / seconds}))


def offline_rate(args, prompts, model_dir):
    command = [sys.executable, __file__, "--offline_worker", model_dir, "--dtype", args.dtype, "--flags", args.flags,
               "--max_tokens", str(args.max_tokens), "--offline_batch", str(args.offline_batch),
               "--seed", str(args.seed)]
    print(f"offline: model.generate, batch {args.offline_batch}, {len(prompts)} prompts ...", end=" ", flush=True)
    out = subprocess.run(command, input=json.dumps([p.text for p in prompts]), capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"\nthe offline measurement failed:\n{out.stderr}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["prompt_tokens"] != sum(len(p.tokens) for p in prompts):  # the premise of one_token_words
        sys.exit(f"\nthe offline prompts are {result['prompt_tokens']} tokens, not the server's "
                 f"{sum(len(p.tokens) for p in prompts)}")
    print(f"{result['output_tokens_per_s']:.1f} output tokens/s", flush=True)
    return result


# ---------------------------------------------------------------------------------------------


def cell(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(args, levels, offline):
    print("\n| concurrency | requests | failures | duration s | requests/s | output tokens/s | total tokens/s "
          "| TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | ITL p50 ms | ITL p99 ms |\n" + "| --- " * 12 + "|")
    for level in levels:
        ttft, tpot, itl = level["ttft_ms"], level["tpot_ms"], level["itl_ms"]
        print(f"| {level['concurrency']} | {level['requests']} | {level['failures']} | {level['duration_s']:.1f} "
              f"| {level['request_throughput']:.2f} | {level['output_tokens_per_s']:.1f} "
              f"| {level['total_tokens_per_s']:.1f} | {cell(ttft['p50'])} | {cell(ttft['p99'])} "
              f"| {cell(tpot['p50'])} | {cell(itl['p50'])} | {cell(itl['p99'])} |")
    print()
    for level in levels:
        print(f"concurrency {level['concurrency']}: {level['tokens_per_text_event']:.1f} output tokens per event "
              f"with text")
        for error, count in level["errors"].items():
            print(f"  {count} failed: {error}")
        for problem, count in level["problems"].items():
            print(f"  {count} of {level['requests'] - level['failures']} answers: {problem}")
    if offline:
        print(f"offline: model.generate, batch {args.offline_batch}, the same {offline['prompts']} prompts and flags: "
              f"{offline['output_tokens_per_s']:.1f} output tokens/s", end="")
        same = [level for level in levels if level["concurrency"] == args.offline_batch]
        if same:
            rate = same[0]["output_tokens_per_s"]
            print(f"; the server at concurrency {args.offline_batch}: {rate:.1f}, "
                  f"{rate / offline['output_tokens_per_s']:.0%} of it")
        else:
            print(f" (no concurrency {args.offline_batch} level to compare it with)")


def parse_levels(values):
    """--max_concurrency 1,4,8 or 1 4 8."""
    return [int(level) for value in values for level in value.split(",") if level]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start serve.py)")
    parser.add_argument("--model_name", default="124M", help="its folder in --models_dir: vocabulary, context")
    parser.add_argument("--models_dir", default=os.path.join(HERE, "models"))
    parser.add_argument("--dtype", default="float32", choices=GENERATION_DTYPES)
    parser.add_argument("--max_batch", type=int, default=8, help="the server's rows (serve.py --max_batch)")
    parser.add_argument("--server_args", default="", help="more flags for serve.py, as one string")
    parser.add_argument("--startup_timeout", type=float, default=900, help="seconds to wait for /health")
    parser.add_argument("--max_concurrency", nargs="+", default=["1,4,8,16"], help="levels, e.g. 1,4,8,16")
    parser.add_argument("--request_rate", type=float, default=math.inf, help="requests/s (inf: all at once)")
    parser.add_argument("--num_prompts", type=int, help="requests per level (default: 4 x concurrency, >= 16)")
    parser.add_argument("--max_tokens", type=int, default=128, help="new tokens per request")
    parser.add_argument("--prompt_tokens", type=int, help="every prompt this long (default: random lengths)")
    parser.add_argument("--min_prompt_tokens", type=int, default=16)
    parser.add_argument("--max_prompt_tokens", type=int, default=256, help="at most the context less --max_tokens")
    parser.add_argument("--flags", default="greedy", choices=FLAG_SETS, help="how tokens are chosen")
    parser.add_argument("--seed", type=int, default=0, help="prompts, arrivals, and the requests' seeds")
    parser.add_argument("--served_model", help="the request's \"model\" field (default: none sent)")
    parser.add_argument("--text_prompts", action="store_true", help="send prompts as text, not token ids")
    parser.add_argument("--extra_body", type=json.loads, default={}, help="JSON fields added to every request")
    parser.add_argument("--request_timeout", type=float, default=600, help="seconds a request may wait for a byte")
    parser.add_argument("--offline", action="store_true", help="also time model.generate on the same prompts")
    parser.add_argument("--offline_batch", type=int, default=8)
    parser.add_argument("--json", help="write every number, and each request's, to this file")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and short runs: checks the script")
    parser.add_argument("--offline_worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.offline_worker:
        return offline_worker(args)

    if args.tiny:
        args.model_name, args.num_prompts, args.max_tokens = "tiny", 8, 16
        if args.max_concurrency == parser.get_default("max_concurrency"):
            args.max_concurrency = ["1,4"]
    args.max_concurrency = parse_levels(args.max_concurrency)
    args.models_dir = os.path.abspath(args.models_dir)  # the server runs from the repository's root
    model_dir = os.path.join(args.models_dir, args.model_name)
    if not os.path.isfile(os.path.join(model_dir, "vocab.bpe")):
        if args.model_name != "tiny" and args.model_name not in ("124M", "355M", "774M", "1558M"):
            sys.exit(f"no model folder {model_dir}, and {args.model_name} is not a shape this script can make")
        from gpt2.testing import make_model_folder

        print(f"making {model_dir} (once) ...", flush=True)
        make_model_folder(model_dir, None if args.model_name == "tiny" else args.model_name)
    from gpt2.encoder import read_encoder
    from gpt2.folders import read_hparams

    n_ctx = read_hparams(model_dir).n_ctx
    longest = n_ctx - args.max_tokens  # the prompt and its new tokens fit the context
    lengths = (args.prompt_tokens,) * 2 if args.prompt_tokens else \
        (min(args.min_prompt_tokens, longest), min(args.max_prompt_tokens, longest))
    if not 1 <= lengths[0] <= lengths[1] <= longest:
        sys.exit(f"prompts of {lengths[0]}-{lengths[1]} tokens and {args.max_tokens} new ones do not fit "
                 f"{args.model_name}'s context of {n_ctx} tokens")
    offline_prompts = num_prompts(args, args.offline_batch) if args.offline else 0
    prompts = make_prompts(read_encoder(model_dir), max([offline_prompts] + [num_prompts(args, c)
                                                                             for c in args.max_concurrency]),
                           lengths, args.seed)

    print(f"processor: {processor()}")
    print(f"{args.model_name} (random weights), {args.dtype}, {args.flags}; prompts of {lengths[0]}-{lengths[1]} "
          f"tokens (seed {args.seed}) as {'text' if args.text_prompts else 'token ids'}, {args.max_tokens} new tokens "
          f"each; request rate {args.request_rate:g}/s; levels {args.max_concurrency}\n", flush=True)

    offline = None
    if args.offline and not args.url:  # first, while no server runs beside it
        offline = offline_rate(args, prompts[:offline_prompts], model_dir)
    if args.url:
        wait_until_ready(args.url.rstrip("/"), args.startup_timeout)
        server = contextlib.nullcontext((args.url.rstrip("/"), None))
    else:
        server = started_server(args)
    with server as (url, command):
        print(f"server: {url}" + (f" ({shlex.join(command[1:])})" if command else ""), flush=True)
        levels = asyncio.run(benchmark(url, args, prompts, n_ctx))
    if args.offline and args.url:
        print("note: the offline rate is measured while the server at --url idles beside it")
        offline = offline_rate(args, prompts[:offline_prompts], model_dir)
    print_table(args, levels, offline)
    if args.json:
        config = {key: value for key, value in vars(args).items() if key != "offline_worker"}
        config["request_rate"] = str(args.request_rate)  # JSON has no inf
        with open(args.json, "w") as f:
            json.dump({"processor": processor(), "config": config, "prompt_lengths": [len(p.tokens) for p in prompts],
                       "levels": levels, "offline": offline}, f, indent=1)


if __name__ == "__main__":
    main()
