"""The server's batcher (gpt2.serving) on a stand-in engine: who gets a row when, what ends a
choice, and what a failing step does. No model: tokens are counters."""
import queue
import threading
import time

import numpy as np
import pytest

from gpt2.engine import Engine, Request, Settings
from gpt2.folders import HParams
from gpt2.serving import Batcher, Busy, Closed, Job

HPARAMS = HParams(n_vocab=100, n_ctx=10 ** 9, n_embd=8, n_head=2, n_layer=1)  # room for "endless" rows


class CountingEngine(Engine):
    """Each row makes its prompt's last token + 1, + 2, ...; `fail_next` makes the next step raise;
    `gate` (a threading.Event), when set, is waited for before each step."""

    fused_steps = False

    def __init__(self, rows):
        super().__init__(HPARAMS, rows)
        self.next, self.left, self.fail_next, self.gate, self.admitted = {}, {}, False, None, []

    def _admit(self, rows, requests):
        for row, request in zip(rows, requests):
            self.next[row], self.left[row] = request.tokens[-1] + 1, request.length
            self.admitted.append(request.tokens[-1])

    def _step(self, n):
        if self.gate is not None:
            self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("out of memory")
        out = np.full([self.rows, 1], -1, np.int32)
        for row in self.live:
            out[row, 0], self.next[row], self.left[row] = self.next[row], self.next[row] + 1, self.left[row] - 1
        return out, np.array([self.left.get(row, 0) > 0 and row in self.live for row in range(self.rows)]), None


def job(prompt, length, n=1, deadline=None):
    """A Job of n choices, and the queue its events go to."""
    events = queue.Queue()
    return Job([Request([prompt], length, Settings(sample=i)) for i in range(n)], events.put, deadline), events


def collect(events, n_choices):
    """Each choice's tokens and finish reason, once every choice has ended."""
    tokens, reasons = [[] for _ in range(n_choices)], [None] * n_choices
    while None in reasons:
        event = events.get(timeout=10)
        tokens[event.index] += event.tokens.tolist()
        if event.finish_reason:
            reasons[event.index] = event.error or event.finish_reason
    return tokens, reasons


def test_choices_wait_for_rows_and_take_them_in_the_order_they_came():
    engine = CountingEngine(2)
    engine.gate = threading.Event()
    batcher = Batcher(engine)
    jobs = [job(10, 3, n=2), job(20, 2), job(30, 1)]
    for j, _ in jobs:
        batcher.submit(j)
    engine.gate.set()
    assert collect(jobs[0][1], 2) == ([[11, 12, 13], [11, 12, 13]], ["length", "length"])
    assert collect(jobs[1][1], 1) == ([[21, 22]], ["length"])
    assert collect(jobs[2][1], 1) == ([[31]], ["length"])
    assert engine.admitted == [10, 10, 20, 30]
    batcher.close()


def test_a_done_choice_frees_its_row_at_the_next_step():
    engine = CountingEngine(1)
    batcher = Batcher(engine)
    long, long_events = job(10, 1000)
    short, short_events = job(50, 2)
    batcher.submit(long)
    batcher.submit(short)  # waits: the only row is taken
    long_events.get(timeout=10)
    long.finish(0)  # a stop string, or the client left
    batcher.wake()
    assert collect(short_events, 1) == ([[51, 52]], ["length"])
    assert engine.next[0] < 10 + 1000
    batcher.close()


def test_a_full_queue_is_busy_and_a_closed_batcher_takes_nothing():
    engine = CountingEngine(1)
    engine.gate = threading.Event()
    batcher = Batcher(engine, max_queue=1)
    batcher.submit(job(10, 5)[0])
    while batcher.rows_in_use() < 1:  # admitted, stepping (held at the gate)
        time.sleep(0.01)
    waiting, waiting_events = job(20, 5)
    batcher.submit(waiting)
    with pytest.raises(Busy):
        batcher.submit(job(30, 5)[0])
    engine.gate.set()
    assert collect(waiting_events, 1) == ([[21, 22, 23, 24, 25]], ["length"])
    batcher.close()
    with pytest.raises(Closed):
        batcher.submit(job(40, 5)[0])


def test_a_deadline_ends_a_choice_with_what_it_has():
    engine = CountingEngine(1)
    batcher = Batcher(engine)
    late, events = job(10, 10_000_000, deadline=time.monotonic() + 0.2)
    batcher.submit(late)
    tokens, reasons = collect(events, 1)
    assert reasons == ["length"] and 0 < len(tokens[0]) < 10_000_000 and batcher.rows_in_use() == 0
    batcher.close()


def test_a_failing_step_ends_its_choices_with_the_error_and_the_next_jobs_are_served():
    engine = CountingEngine(2)
    engine.gate = threading.Event()
    batcher = Batcher(engine)
    failing, failing_events = job(10, 5, n=2)
    batcher.submit(failing)
    while batcher.rows_in_use() < 2:
        time.sleep(0.01)
    engine.fail_next = True
    engine.gate.set()
    assert collect(failing_events, 2)[1] == ["the model failed: RuntimeError: out of memory"] * 2
    after, after_events = job(20, 2)
    batcher.submit(after)
    assert collect(after_events, 1) == ([[21, 22]], ["length"])
    assert sorted(engine.free) == [0, 1]
    batcher.close()
