"""Continuous batching: one thread steps one engine (gpt2.engine) for every request the server has.

A completion's life on the server (its `n` choices are one engine row each; llama.cpp's server
calls rows slots):

1. Queued: `Batcher.submit(job)` puts the job's choices in the line of waiting choices, first
   come first served, or refuses it at once (`Busy`) when `max_queue` jobs are already waiting.
2. Admitted: before each step, the decoding thread gives waiting choices the engine's free rows,
   all in one `engine.admit` (the prompts run in one pass; choices with the same prompt run it
   once). A choice joins at the next step, beside rows that are halfway through theirs.
3. Stepped: each step makes up to a few tokens for every live row (as many as fit in
   `step_seconds`: one call of the compiled loop has a cost of its own, worth sharing; one token
   right after an admission, so that the new rows' first token comes at once), and hands
   each choice's new tokens to its job (`job.deliver`, from this thread: the server passes them on
   to the request's event loop). A row's tokens depend only on its own prompt, seed, sample
   number and flags, never on the rows beside it.
4. Freed: a row is released, and free for the next waiting choice at the next step, as soon as
   its choice ended (its stop token, or its tokens made), is done (the server found a stop
   string, or the client went away) or its deadline passed (it ends with what it has).

The engine is touched by this thread alone; other threads only queue jobs and mark their choices done.
`close()` ends every job with what it has (the server drains its requests before it closes).
"""
import collections
import sys
import threading
import time
import traceback
from typing import NamedTuple, Optional

import numpy as np

from .engine import Logprobs
from .errors import GPT2Error


class Busy(GPT2Error):
    """The waiting line is full: the client should try again later."""


class Closed(GPT2Error):
    """The server is shutting down and takes no new requests."""


class Event(NamedTuple):
    """What a choice got from one step (or how it ended)."""
    index: int  # the choice's place in its job
    tokens: np.ndarray  # int32: its new tokens (its stop token, if it drew it, last)
    logprobs: Optional[Logprobs]  # where it asked for them
    finish_reason: Optional[str] = None  # on its last event: "stop" (its stop token) or "length"
    error: Optional[str] = None  # the step failed: the message for the client (the choice ends)


class Job:
    """One request's choices (an engine Request each) and where their tokens go.

    `deliver(event)` is called from the decoding thread for each choice's new tokens and once more
    (or with them) when it ends. `deadline`: a time.monotonic() after which its choices end.
    """

    def __init__(self, requests, deliver, deadline=None):
        self.requests, self.deliver, self.deadline = list(requests), deliver, deadline
        self.done = set()  # choices that need no more tokens (set by other threads): rows freed, or never given

    def finish(self, index=None):
        """Choice `index` (None: every one) needs no more tokens (a stop string, the client went
        away): its row is freed at the next step. Call Batcher.wake after."""
        self.done.update(range(len(self.requests)) if index is None else [index])


class Choice(NamedTuple):
    job: Job
    index: int


class Batcher:
    """Steps `engine` in a thread of its own for the jobs submitted (see the module's docstring)."""

    def __init__(self, engine, *, max_queue=64, step_seconds=0.25):
        self.engine, self.max_queue, self.step_seconds = engine, max_queue, step_seconds
        self.waiting = collections.deque()  # Choices not admitted yet, in the order they came
        self.running = {}  # row -> Choice
        self.closing = False
        self.changed = threading.Condition()  # a job came, a choice is done, or the batcher closes
        self.seconds_per_token = None  # the pace of the engine's step, once measured
        self.thread = threading.Thread(target=self.run, name="gpt2-batcher", daemon=True)
        self.thread.start()

    def submit(self, job):
        """Queue `job`'s choices; raise Busy when max_queue jobs are waiting, Closed when closing."""
        with self.changed:
            if self.closing:
                raise Closed("the server is shutting down")
            if self.jobs_waiting() >= self.max_queue:
                raise Busy(f"its queue of waiting requests is full ({self.max_queue}, --max_queue)")
            self.waiting.extend(Choice(job, index) for index in range(len(job.requests)))
            self.changed.notify()

    def jobs_waiting(self):
        """Jobs with a choice that has no row yet (read from any thread)."""
        return len({id(choice.job) for choice in list(self.waiting)})

    def jobs_running(self):
        """Jobs with a choice in a row."""
        return len({id(choice.job) for choice in list(self.running.values())})

    def rows_in_use(self):
        return len(self.running)

    def wake(self):
        """Have the thread look again (a choice was finished from outside)."""
        with self.changed:
            self.changed.notify()

    def close(self):
        """Take no more jobs and end every one with what it has; returns once the thread is done."""
        with self.changed:
            self.closing = True
            self.changed.notify()
        self.thread.join()

    def run(self):
        while True:
            with self.changed:
                while not self.waiting and not self.running and not self.closing:
                    self.changed.wait()
                if self.closing:
                    for choice in list(self.waiting) + list(self.running.values()):
                        self.end(choice, "length")
                    for row in list(self.running):
                        self.release(row)
                    return
                self.waiting = collections.deque(c for c in self.waiting if not self.drop_waiting(c))
                admitted = [self.waiting.popleft() for _ in range(min(len(self.engine.free), len(self.waiting)))]
            self.free_rows()
            try:
                if admitted:
                    self.admit(admitted)
                if self.running:
                    # A step that follows an admission makes one token: the new rows' first token comes at once.
                    self.step(1 if admitted else None)
            except Exception as e:  # a failure nobody foresaw: the choices it touched end with it; the server goes on
                traceback.print_exc(file=sys.stderr)
                for choice in set(admitted) | set(self.running.values()):
                    choice.job.deliver(Event(choice.index, np.zeros(0, np.int32), None, "length",
                                             f"the model failed: {type(e).__name__}: {e}"))
                for row in list(self.running):
                    self.release(row)

    def drop_waiting(self, choice):
        """Whether a waiting choice goes without a row: it is done, or its deadline passed."""
        job = choice.job
        if choice.index in job.done:
            return True
        if job.deadline is not None and time.monotonic() > job.deadline:
            self.end(choice, "length")
            return True
        return False

    def admit(self, choices):
        rows = self.engine.admit([choice.job.requests[choice.index] for choice in choices])
        for row, choice in zip(rows, choices):
            self.running[row] = choice

    def step(self, n=None):
        """Up to n tokens for every running row (None: as many as take about step_seconds)."""
        if n is None:
            n = 1 if self.seconds_per_token is None or not self.engine.fused_steps else \
                max(1, int(self.step_seconds / self.seconds_per_token))
        started = time.perf_counter()
        step = self.engine.step(n)  # fewer, once every row has ended
        seconds = time.perf_counter() - started
        made = max((len(tokens) for tokens in step.tokens.values()), default=0)
        if made:
            # Paced by the latest steps (the first one compiles the loop, the cache grows now and then).
            pace = seconds / made
            self.seconds_per_token = pace if self.seconds_per_token is None else \
                min(pace, 2 * self.seconds_per_token) * 0.5 + self.seconds_per_token * 0.5
        ended = set(step.ended)
        for row, tokens in step.tokens.items():
            choice = self.running[row]
            reason = None
            if row in ended:
                stop_token = choice.job.requests[choice.index].settings.stop_token
                reason = "stop" if len(tokens) and tokens[-1] == stop_token else "length"
            choice.job.deliver(Event(choice.index, tokens, step.logprobs.get(row), reason))
        for row in ended:
            self.release(row)

    def free_rows(self):
        """Release the rows whose choice is done, or whose deadline passed."""
        now = time.monotonic()
        for row, choice in list(self.running.items()):
            job = choice.job
            if choice.index in job.done:
                self.release(row)
            elif job.deadline is not None and now > job.deadline:
                self.end(choice, "length")
                self.release(row)

    def end(self, choice, reason):
        choice.job.deliver(Event(choice.index, np.zeros(0, np.int32), None, reason))

    def release(self, row):
        self.engine.release(row)
        del self.running[row]
