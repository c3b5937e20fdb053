"""The decoding engine: rows that each continue their own tokens, side by side in one batch.

An engine has a fixed number of rows (slots, as llama.cpp's server calls them). A row's life:

1. Admitted: `engine.admit(requests)` gives each Request (its prompt's tokens, how many tokens
   to make, its Settings) a free row. The prompt but its last token runs through the model into
   the row's own slots of the cache: the prefill. The tokens that every row of the engine starts
   with (its `prefix`: the prompt of several samples) ran once, when the engine was made, into a
   cache that all rows read. The row now carries, as data: its last token, the slot it goes into,
   its seed and sample number, how many tokens it has made, how many it may still make, its
   flags (temperature, top_k, top_p, min_p, the penalties, logit_bias, bad words), its text so
   far (which the penalties count) and its stop token.
2. Stepped: `engine.step(n)` feeds every live row its latest token and draws its next one, up
   to n times (fewer once every row has ended), and returns each live row's new tokens. A row
   ends when it draws its stop token (returned, as its last token) or has made its tokens; it then
   makes nothing more. Its draw at step t is keyed by (seed, sample number, t) alone
   (gpt2.sampling), so its tokens do not depend on the rows beside it, nor on when it was admitted.
3. Released: `engine.release(row)` frees the row for the next request. Nothing of it is read
   again: a row's queries see only its own slots up to its position, and the next prefill and
   steps overwrite the slots it used.

Two kinds of engine have this interface: gpt2.decode.XlaEngine (float32, bfloat16 and float16
weights: the step is an XLA-compiled loop, traced once per engine shape: rows, cache slots and
shared slots, which come in a few sizes; the flags are tensors of its state) and
gpt2.int8.Int8Engine (int8 weights: each step runs TensorFlow Lite programs, and NumPy draws the
tokens). `Replicas` spreads rows over several engines (one per device) behind the same interface.
`decode_requests` is the one driver that gpt2.api's generate and stream run, and that other callers
(a server, a pipeline) run too.

An engine serves one caller at a time (its lock makes admit, step and release take turns), and
engines on one model do not share state: two threads, or two interleaved generators, each with
its own engine, get what each gets alone.
"""
import collections
import concurrent.futures
import threading
import time
from typing import Dict, List, NamedTuple, Optional

import numpy as np



NO_TOKEN = -1  # what fills up the rows of per-row token lists (logit_bias's tokens, bad words)
MAX_LOGPROBS = 20  # the most alternatives a caller may ask for, per token (vLLM's default limit)
MIN_TEMPERATURE = 1e-9  # what a temperature above 0 divides the logits by at least


class Settings(NamedTuple):
    """How a row chooses its tokens (gpt2.sampling has the rules and their order)."""
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: every token
    top_p: float = 1.0  # 1: every token
    seed: int = 0
    sample: int = 0  # the sample number: the row's draws are keyed by (seed, sample, step)
    stop_token: Optional[int] = None  # the row ends once it draws it
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    repeat_last_n: int = 0  # the text's last tokens that repetition_penalty counts; 0: all
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0  # 0: off
    logit_bias: tuple = ()  # (token, bias) pairs; a bias of -inf bans the token
    bad_words: tuple = ()  # token sequences that the row never completes
    logprobs: Optional[int] = None  # how many alternatives of each token to return with its log-probability


class Request(NamedTuple):
    """What a row is admitted with."""
    tokens: list  # the prompt (at least one token)
    length: int  # how many tokens to make at most
    settings: Settings


class Logprobs(NamedTuple):
    """The log-probabilities of a row's new tokens under the model's own distribution (before any rule)."""
    chosen: np.ndarray  # [k] float32: each new token's
    top_tokens: np.ndarray  # [k, n] int32: the n most likely tokens at each step, most likely first
    top_logprobs: np.ndarray  # [k, n] float32: theirs


class Step(NamedTuple):
    """What a step made."""
    tokens: Dict[int, np.ndarray]  # row -> its new tokens (int32), for every row that was live
    ended: List[int]  # the rows that ended in this step: each drew its stop token or made its tokens
    logprobs: Dict[int, Logprobs] = {}  # for the rows that asked for them


class Adjustments(NamedTuple):
    """What each row's logits are adjusted by before its token is chosen (gpt2.sampling.adjust), [batch]
    each unless said: arrays, or tensors in a compiled loop."""
    history: np.ndarray  # [batch, H] int32: the row's text, its prompt then its sample; later slots unused
    text_len: np.ndarray  # int32: tokens in the history
    prompt_len: np.ndarray  # int32: the prompt's tokens among them
    bias_tokens: np.ndarray  # [batch, B] int32: logit_bias's tokens (NO_TOKEN: none) ...
    bias_values: np.ndarray  # [batch, B] float32: ... and their biases (-inf: a banned token)
    bad_words: np.ndarray  # [batch, W, L] int32: token sequences never to complete (NO_TOKEN after each)
    no_repeat_ngram_size: np.ndarray  # int32; 0: off
    repetition_penalty: np.ndarray  # float32; 1: off
    repeat_last_n: np.ndarray  # int32: the last tokens of the text that count for it; 0: all
    presence_penalty: np.ndarray  # float32; 0: off
    frequency_penalty: np.ndarray  # float32; 0: off


class Rows(NamedTuple):
    """What each row carries from step to step, as arrays [rows] (tensors in a compiled loop): data
    of the step, not part of its program."""
    token: np.ndarray  # int32: the latest token, fed at the next step
    pos: np.ndarray  # int32: the slot of the row's own cache that it goes into
    made: np.ndarray  # int32: tokens made so far, the next draw's step number
    left: np.ndarray  # int32: tokens it may still make; 0: ended, or free
    row_seeds: np.ndarray  # [rows, 2] int64: (seed, sample number)
    temperature: np.ndarray  # float32; 0: greedy (an ended or free row draws greedily: no work for the rules)
    top_k: np.ndarray  # int32; 0: every token
    top_p: np.ndarray  # float32
    min_p: np.ndarray  # float32
    stop_token: np.ndarray  # int32; -1: none
    logprobs: np.ndarray  # int32: alternatives to return; -1: no log-probabilities
    # What gpt2.sampling.adjust reads (its Adjustments):
    history: np.ndarray  # [rows, n_ctx + 1] int32: the row's text, prompt then sample
    text_len: np.ndarray  # int32
    prompt_len: np.ndarray  # int32
    bias_tokens: np.ndarray  # [rows, B] int32 (NO_TOKEN: none)
    bias_values: np.ndarray  # [rows, B] float32
    bad_words: np.ndarray  # [rows, W, L] int32 (NO_TOKEN after each word)
    no_repeat_ngram_size: np.ndarray  # int32
    repetition_penalty: np.ndarray  # float32
    repeat_last_n: np.ndarray  # int32
    presence_penalty: np.ndarray  # float32
    frequency_penalty: np.ndarray  # float32

    @classmethod
    def empty(cls, n, n_ctx):
        """n free rows of a model with a context of n_ctx tokens."""
        zeros = lambda dtype: np.zeros(n, dtype)  # noqa: E731
        return cls(token=zeros(np.int32), pos=zeros(np.int32), made=zeros(np.int32), left=zeros(np.int32),
                   row_seeds=np.zeros([n, 2], np.int64), temperature=zeros(np.float32), top_k=zeros(np.int32),
                   top_p=np.ones(n, np.float32), min_p=zeros(np.float32), stop_token=np.full(n, -1, np.int32),
                   logprobs=np.full(n, -1, np.int32), history=np.zeros([n, n_ctx + 1], np.int32),
                   text_len=zeros(np.int32), prompt_len=zeros(np.int32),
                   bias_tokens=np.full([n, 1], NO_TOKEN, np.int32), bias_values=np.zeros([n, 1], np.float32),
                   bad_words=np.full([n, 1, 1], NO_TOKEN, np.int32), no_repeat_ngram_size=zeros(np.int32),
                   repetition_penalty=np.ones(n, np.float32), repeat_last_n=zeros(np.int32),
                   presence_penalty=zeros(np.float32), frequency_penalty=zeros(np.float32))

    def copy(self):
        return Rows(*(np.array(values) for values in self))

    def admitted(self, rows, n_prefix, requests, n_vocab):
        """These rows with `rows` set to the requests' (whose tokens start with n_prefix tokens that
        the engine runs once for all rows): each holds its last prompt token, to feed at its first
        step. The lists of logit_bias and bad words widen to the longest a row has (rounded up to
        a power of two: a new width compiles the loop again)."""
        most_bias = max([len(r.settings.logit_bias) for r in requests] + [self.bias_tokens.shape[1]])
        most_words = max([len(r.settings.bad_words) for r in requests] + [self.bad_words.shape[1]])
        longest_word = max([len(w) for r in requests for w in r.settings.bad_words] + [self.bad_words.shape[2]])
        bias, words, longest = (1 << (n - 1).bit_length() for n in (most_bias, most_words, longest_word))
        values = self._replace(
            bias_tokens=widened(self.bias_tokens, [bias - self.bias_tokens.shape[1]], NO_TOKEN),
            bias_values=widened(self.bias_values, [bias - self.bias_values.shape[1]], 0),
            bad_words=widened(self.bad_words, [words - self.bad_words.shape[1], longest - self.bad_words.shape[2]],
                              NO_TOKEN)).copy()
        for row, request in zip(rows, requests):
            tokens, settings = list(request.tokens), request.settings
            values.token[row], values.pos[row], values.made[row] = tokens[-1], len(tokens) - 1 - n_prefix, 0
            values.left[row] = request.length
            values.row_seeds[row] = settings.seed, settings.sample
            values.temperature[row], values.top_k[row] = settings.temperature, min(settings.top_k, n_vocab)
            values.top_p[row], values.min_p[row] = settings.top_p, settings.min_p
            values.stop_token[row] = -1 if settings.stop_token is None else settings.stop_token
            values.logprobs[row] = -1 if settings.logprobs is None else settings.logprobs
            values.history[row, :len(tokens)] = tokens
            values.text_len[row] = values.prompt_len[row] = len(tokens)
            values.bias_tokens[row], values.bias_values[row] = NO_TOKEN, 0
            for i, (token, bias) in enumerate(settings.logit_bias):
                values.bias_tokens[row, i], values.bias_values[row, i] = token, bias
            values.bad_words[row] = NO_TOKEN
            for i, word in enumerate(settings.bad_words):
                values.bad_words[row, i, :len(word)] = word
            values.no_repeat_ngram_size[row] = settings.no_repeat_ngram_size
            values.repetition_penalty[row], values.repeat_last_n[row] = (settings.repetition_penalty,
                                                                         settings.repeat_last_n)
            values.presence_penalty[row] = settings.presence_penalty
            values.frequency_penalty[row] = settings.frequency_penalty
        return values

    def free(self, row):
        self.left[row], self.temperature[row], self.logprobs[row] = 0, 0, -1
        self.no_repeat_ngram_size[row], self.repetition_penalty[row] = 0, 1
        self.presence_penalty[row], self.frequency_penalty[row] = 0, 0
        self.bias_tokens[row], self.bad_words[row] = NO_TOKEN, NO_TOKEN


def widened(array, more, fill):
    """`array` with `more` [per axis after the first] entries of `fill` added at the end of each axis."""
    return np.pad(array, [(0, 0)] + [(0, n) for n in more], constant_values=fill)


def shared_prefix_length(contexts):
    """How many tokens all contexts start with, leaving each at least one of its own.

    A row's last prompt token is fed by its first step: its logits give the first new token.
    """
    n = min(len(c) for c in contexts) - 1
    for i in range(n):
        if any(c[i] != contexts[0][i] for c in contexts):
            return i
    return n


def bucket(n, limit):
    """n rounded up to one of 16, 24, 32, 48, 64, 96, ... (powers of two and 1.5 times them), at most `limit`.

    Few sizes, so few compilations; and at most a third of the cache is slots that are never
    filled (every step reads the whole cache, so unused slots cost time).
    """
    size = 16
    while size < n:
        size = size // 2 * 3 if size & (size - 1) == 0 else size // 3 * 4
    return min(size, limit)


def decoding_memory(hparams, rows, context_len, length, itemsize):
    """About how many bytes decoding `rows` rows of up to `context_len` prompt tokens and `length`
    new ones needs beyond the weights, in weights of `itemsize` bytes; it grows with the rows.

    The cache dominates: keys and values of every layer and slot, twice while a compiled call
    returns the updated copy of its input (docs/performance.md has 1558M's measured peak). Then
    the prompt's pass, whose largest
    pieces are one layer's attention scores (float32, and the softmax of them) and MLP activations,
    and each step's float32 logits with the copies that sampling makes of them.
    """
    cache_len = bucket(context_len + length - 1, hparams.n_ctx)  # as XlaEngine lays it out, unshared
    cache = 2 * hparams.n_layer * cache_len * hparams.n_embd * itemsize
    prompt_pass = context_len * (2 * hparams.n_head * cache_len * 4 + 2 * 4 * hparams.n_embd * itemsize)
    step = 4 * hparams.n_vocab * 4
    return rows * (2 * cache + prompt_pass + step)


class Engine:
    """The bookkeeping that every kind of engine shares: which rows are free, live or ended, and
    the lock. A kind implements `_admit(rows, requests)`, `_step(n)` (returning the new tokens
    [rows, <= n], -1 where a row made none; which rows are still live; and, where a row asked for
    them, the log-probabilities as a Logprobs of [rows, <= n] and [rows, <= n, MAX_LOGPROBS]
    arrays, else None) and optionally `_release(row)`."""

    # Whether several steps in one call cost less than as many calls (a compiled loop): a stream
    # then asks for a fifth of a second's tokens a call, instead of one.
    fused_steps = True

    def __init__(self, hparams, rows, prefix=()):
        if rows < 1:
            raise ValueError(f"an engine needs at least one row, not {rows}")
        self.hparams, self.rows, self.prefix = hparams, rows, list(prefix)
        self.free = list(range(rows))
        self.live = set()  # admitted rows that have not ended
        self.logprobs = {}  # row -> how many alternatives it asked for, with the log-probabilities
        self.lock = threading.Lock()

    def admit(self, requests):
        """Give each Request a free row, run its prompt, and return the rows (in the requests' order)."""
        with self.lock:
            if len(requests) > len(self.free):
                raise ValueError(f"{len(requests)} requests but {len(self.free)} free rows")
            n_prefix, room = len(self.prefix), self.hparams.n_ctx + 1
            for request in requests:
                tokens = list(request.tokens)
                if tokens[:n_prefix] != self.prefix or len(tokens) <= n_prefix:
                    raise ValueError("a request must start with the engine's prefix and have a token of its own")
                if request.length < 1 or len(tokens) + request.length > room:
                    raise ValueError(f"{len(tokens)} prompt tokens and {request.length} new ones do not fit the "
                                     f"model's context of {self.hparams.n_ctx}")
            rows, self.free = self.free[:len(requests)], self.free[len(requests):]
            try:
                self._admit(rows, requests)
            except BaseException:  # the rows stay free (a prompt's pass ran out of memory, Ctrl-C)
                self.free = sorted(self.free + rows)
                raise
            self.live.update(rows)
            self.logprobs.update({row: request.settings.logprobs for row, request in zip(rows, requests)
                                  if request.settings.logprobs is not None})
            return rows

    def step(self, n=1):
        """Up to n more tokens for every live row (fewer for rows that end): a Step."""
        with self.lock:
            if not self.live:
                return Step({}, [])
            out, live, logprobs = self._step(n)
            tokens = {row: out[row][out[row] >= 0] for row in sorted(self.live)}
            ended = [row for row in sorted(self.live) if not live[row]]
            asked = {row: Logprobs(logprobs.chosen[row][:len(tokens[row])],
                                   logprobs.top_tokens[row][:len(tokens[row]), :n],
                                   logprobs.top_logprobs[row][:len(tokens[row]), :n])
                     for row, n in self.logprobs.items() if row in self.live} if logprobs else {}
            self.live.difference_update(ended)
            return Step(tokens, ended, asked)

    def release(self, row):
        """Free `row` for another request, whether it ended or not."""
        with self.lock:
            if row in self.free or not 0 <= row < self.rows:
                raise ValueError(f"row {row} is not admitted")
            self.live.discard(row)
            self.logprobs.pop(row, None)
            self._release(row)
            self.free.append(row)
            self.free.sort()

    def _release(self, row):
        pass


class Replicas:
    """Several engines (one per device, each with its copy of the weights) as one: rows are given
    to the engine with the most free rows, and each step runs every engine's step at once, each
    in a thread of its own (TensorFlow lets go of the interpreter while it computes)."""

    def __init__(self, engines):
        self.engines = engines
        self.rows = sum(engine.rows for engine in engines)
        self.fused_steps = all(engine.fused_steps for engine in engines)
        self.where = {}  # row -> (engine, its row there)
        self.threads = concurrent.futures.ThreadPoolExecutor(len(engines))

    @property
    def free(self):
        return [row for row in range(self.rows) if row not in self.where]

    def admit(self, requests):
        free = [len(engine.free) for engine in self.engines]
        if len(requests) > sum(free):
            raise ValueError(f"{len(requests)} requests but {sum(free)} free rows")
        shares = collections.defaultdict(list)  # engine index -> indexes of requests
        for index in range(len(requests)):
            most = max(range(len(free)), key=lambda e: free[e])
            shares[most].append(index)
            free[most] -= 1
        rows = [None] * len(requests)
        numbers = iter(self.free)
        for e, indexes in shares.items():
            for index, engine_row in zip(indexes, self.engines[e].admit([requests[i] for i in indexes])):
                rows[index] = next(numbers)
                self.where[rows[index]] = (e, engine_row)
        return rows

    def step(self, n=1):
        steps = list(self.threads.map(lambda engine: engine.step(n), self.engines))
        back = {where: row for row, where in self.where.items()}
        tokens = {back[e, row]: made for e, step in enumerate(steps) for row, made in step.tokens.items()}
        logprobs = {back[e, row]: made for e, step in enumerate(steps) for row, made in step.logprobs.items()}
        return Step(dict(sorted(tokens.items())), sorted(back[e, row] for e, step in enumerate(steps)
                                                         for row in step.ended), logprobs)

    def release(self, row):
        e, engine_row = self.where.pop(row)
        self.engines[e].release(engine_row)


class Made(NamedTuple):
    """New tokens of one request, as `decode_requests` yields them."""
    index: int  # the request's place in the list
    tokens: np.ndarray  # int32
    ended: bool  # it drew its stop token (the last of `tokens`) or made its tokens
    logprobs: Optional[Logprobs] = None  # where the request asked for them


def decode_requests(engine, requests, *, chunk_size=None, chunk_seconds=None, is_finished=None):
    """Decode `requests` on `engine`, as many at a time as it has free rows, admitting the next
    ones as rows end; yields a Made for each request that got tokens, after each step.

    A step makes up to `chunk_size` tokens a row (None: as many as the longest request has left).
    With `chunk_seconds`, each step after the first two makes as many tokens as the step before
    made in that time (at least one): the first step compiles the loop, the second measures its
    pace; an engine that does not fuse steps makes one token a step. `is_finished(index)`: a
    request the caller needs no more tokens of (its text reached a stop string) is released at once.
    Requests still running when the caller stops iterating are released.
    """
    pending = collections.deque(range(len(requests)))
    running = {}  # row -> index of the request
    left = [request.length for request in requests]
    seconds_per_token, steps = None, 0
    try:
        while pending or running:
            n_free = min(len(engine.free), len(pending))
            if n_free:
                indexes = [pending.popleft() for _ in range(n_free)]
                for row, index in zip(engine.admit([requests[i] for i in indexes]), indexes):
                    running[row] = index
            if not running:
                raise ValueError("the engine has no free row")
            n = max(left[index] for index in running.values())
            n = n if chunk_size is None else min(chunk_size, n)
            if chunk_seconds is not None:
                n = 1 if seconds_per_token is None or not engine.fused_steps else \
                    min(n, max(1, int(chunk_seconds / seconds_per_token)))
            started = time.perf_counter()
            step = engine.step(n)
            made = max((len(tokens) for tokens in step.tokens.values()), default=0)
            if chunk_seconds is not None and steps > 0 and made:  # not the step that compiled the loop
                seconds_per_token = (time.perf_counter() - started) / made
            steps += 1
            ended = set(step.ended)
            for row, tokens in step.tokens.items():
                index = running[row]
                left[index] -= len(tokens)
                yield Made(index, tokens, row in ended, step.logprobs.get(row))
            for row in list(running):
                if row in ended or is_finished is not None and is_finished(running[row]):
                    engine.release(row)
                    del running[row]
    finally:
        for row in running:
            engine.release(row)
