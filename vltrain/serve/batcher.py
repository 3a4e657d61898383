"""The bounded queue between the HTTP handlers and the one thread that runs the model.

Handlers encode a request (`Engine.encode`) and `submit` a `Job`; the worker thread takes the oldest job, waits
`batch_wait_ms` for others to arrive, and answers up to `max_batch_size` jobs of the same group (served model,
sampling settings) with ONE `Engine.generate_ids` call, left padded as `vltrain.infer` batches. A stopping
criterion (`_Rows`) sees every generated token of every row: it ends a row at its own `max_tokens`, stop words or
the template's stop token, or when its client went away, streams the row's text to its handler, and the
generate call returns when every row has ended. Rows of different adapters (and of the base) share one call
through peft's mixed-adapter batches (`adapter_names`) when all LoRA layers are in the language model; LoRA on
the projector or vision tower sees tiles, not rows, so there each served name gets calls of its own.

Text is decoded by `Engine.decode` (cut at the stop token and stop words, stripped), so the final reply equals the
Python API's for the same ids; a stream sends only text that cannot change any more (no half character, no
trailing whitespace, nothing that could begin a stop word), so its deltas add up to the final reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from vltrain.data.encode import Sample
from vltrain.serve.schemas import APIError

log = logging.getLogger(__name__)
_ids = itertools.count()


@dataclass(eq=False)
class Job:
    """One request on its way through the queue. `events` receives ("delta", text) while streaming, then
    ("end", reply, finish_reason, completion_tokens) or ("error", APIError)."""

    sample: Sample
    model: str
    max_tokens: int
    stop_words: list[str]
    sampling: dict
    """Generation config overrides: {} (the model's own), {"do_sample": False} or do_sample/temperature/top_p."""
    seed: int | None
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    number: int = field(default_factory=lambda: next(_ids))
    submitted: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    # worker-side state
    ids: list[int] = field(default_factory=list)
    words: list[str] = field(default_factory=list)
    sent: str = ""
    finished: bool = False
    released: bool = False

    def group(self, mixed_models: bool) -> tuple:
        """Jobs of one group share a generate call: one sampling setting, and one served name unless names mix
        (`mixed_models`). A seeded sampling job is alone, so that its seed decides its reply."""
        sampling = tuple(sorted(self.sampling.items()))
        alone = self.number if self.seed is not None and self.sampling.get("do_sample") else None
        return (None if mixed_models else self.model), sampling, alone

    def post(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (the server stopped): nobody is listening
            pass


class Batcher:
    def __init__(self, served, max_batch_size: int, max_queue: int, batch_wait_ms: float, metrics):
        self.served = served
        self.engine = served.engine
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait = batch_wait_ms / 1000
        self.metrics = metrics
        self.pending: deque[Job] = deque()
        self.active = 0  # jobs waiting or running: what max_queue bounds
        self.running = 0  # jobs of the generate call now running that have not ended
        self.cond = threading.Condition()
        self.closing = False
        self.thread = threading.Thread(target=self._work, name="vltrain-serve-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def check_room(self) -> None:
        """429 when the queue is full, 503 while shutting down (before a request's media are fetched and encoded;
        `submit` checks again)."""
        if self.closing:
            raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")
        if self.active >= self.max_queue:
            raise APIError(429, f"the server's queue is full ({self.max_queue} requests waiting or running); "
                                "retry later", "rate_limit_error", code="queue_full")

    def submit(self, job: Job) -> None:
        with self.cond:
            self.check_room()
            self.active += 1
            self.pending.append(job)
            self._gauges()
            self.cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client went away: a waiting job leaves the queue, a running one ends at its next token."""
        with self.cond:
            job.cancelled = True
            if job in self.pending:
                self.pending.remove(job)
                self._release(job)

    def close(self) -> None:
        """Answer what is queued, then stop the worker."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join()

    def _release(self, job: Job) -> None:  # under self.cond
        if not job.released:
            job.released = True
            self.active -= 1
            self._gauges()

    def _gauges(self) -> None:
        self.metrics.queue_depth.set(len(self.pending))
        self.metrics.running.set(self.running)

    def _take(self) -> list[Job] | None:
        with self.cond:
            while not self.pending:
                if self.closing:
                    return None
                self.cond.wait()
            deadline = time.monotonic() + self.batch_wait
            while len(self.pending) < self.max_batch_size and not self.closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            if not self.pending:  # everything waiting was cancelled meanwhile
                return []
            mixed = self.served.mixed_batches
            group = self.pending[0].group(mixed)
            jobs = [j for j in self.pending if j.group(mixed) == group][:self.max_batch_size]
            for job in jobs:
                self.pending.remove(job)
            self.running = len(jobs)
            self._gauges()
            return jobs

    def _work(self) -> None:
        while (jobs := self._take()) is not None:
            if not jobs:
                continue
            try:
                self._generate(jobs)
            except Exception as e:  # noqa: BLE001 - a failure of the model, not of the request: each gets a 500
                log.exception("generation failed for %d request(s)", len(jobs))
                for job in jobs:
                    if not job.finished:
                        job.finished = True
                        job.post("error", APIError(500, f"generation failed: {type(e).__name__}: {e}",
                                                   "server_error"))
            finally:
                with self.cond:
                    for job in jobs:
                        self._release(job)
                    self.running = 0
                    self._gauges()

    def _generate(self, jobs: list[Job]) -> None:
        first = jobs[0]
        kwargs = self.engine.generation_kwargs(max_new_tokens=max(j.max_tokens for j in jobs), **first.sampling)
        gen = kwargs["generation_config"]
        model_words = list(gen.stop_strings or [])
        gen.stop_strings = None  # every row's words are checked by _Rows, each row its own
        kwargs.pop("tokenizer", None)
        for job in jobs:
            job.words = job.stop_words + model_words
        self.metrics.batch_size.observe(len(jobs))
        extra = {"stopping_criteria": StoppingCriteriaList([_Rows(jobs, self)])}
        if self.served.mixed_batches:
            extra["adapter_names"] = self.served.adapter_names([j.model for j in jobs])
            context = contextlib.nullcontext()
        else:
            context = self.served.adapter_context(first.model)
        with context:
            if first.seed is not None:
                torch.manual_seed(first.seed)
            new = self.engine.generate_ids([j.sample for j in jobs], kwargs, **extra)
        for job, ids in zip(jobs, new):  # rows ended by generate itself (max_new_tokens) end here
            if not job.finished:
                self._end(job, "length")

    # ---- per row, called from _Rows in the worker thread ----------------------------------------------------

    def _add(self, job: Job, token: int) -> None:
        if job.cancelled:
            self._end(job, "cancelled")
            return
        if job.first_token is None:
            job.first_token = time.monotonic()
            self.metrics.ttft.observe(job.first_token - job.submitted)
        job.ids.append(token)
        if token == self.engine.stop_id:
            self._end(job, "stop")
            return
        if job.words:
            raw = self.engine.tokenizer.decode(job.ids, skip_special_tokens=False)
            if any(w in raw for w in job.words):
                self._end(job, "stop")
                return
        if len(job.ids) >= job.max_tokens:
            self._end(job, "length")
        elif job.stream:
            self._send(job, _stable(self.engine.decode(job.ids, job.words), job.words))

    def _send(self, job: Job, text: str) -> None:
        if text.startswith(job.sent) and len(text) > len(job.sent):
            job.post("delta", text[len(job.sent):])
            job.sent = text

    def _end(self, job: Job, reason: str) -> None:
        job.finished = True
        with self.cond:
            self.running -= 1
            self._release(job)
        if reason == "cancelled":
            return
        reply = self.engine.decode(job.ids, job.words)
        if job.stream:
            if not reply.startswith(job.sent):
                log.warning("request %d: the streamed text %r is not a prefix of the reply %r", job.number,
                            job.sent, reply)
            self._send(job, reply)
        job.post("end", reply, reason, len(job.ids))


def _stable(text: str, words: list[str]) -> str:
    """The part of a reply so far that later tokens cannot change: no trailing half character (U+FFFD) and no
    ending that could be the start of a stop word. (`Engine.decode` already stripped trailing whitespace.)"""
    text = text.rstrip("\ufffd")
    for word in words:
        for k in range(min(len(word) - 1, len(text)), 0, -1):
            if text.endswith(word[:k]):
                text = text[:-k]
                break
    return text.rstrip()


class _Rows(StoppingCriteria):
    """Sees each step's new token of every row (before any streamer): feeds the rows' jobs and tells generate
    which rows have ended."""

    def __init__(self, jobs: list[Job], batcher: Batcher):
        self.jobs = jobs
        self.batcher = batcher

    def __call__(self, input_ids, scores, **kwargs):
        last = input_ids[:, -1].tolist()
        for job, token in zip(self.jobs, last):
            if not job.finished:
                self.batcher._add(job, token)
        return torch.tensor([j.finished for j in self.jobs], dtype=torch.bool, device=input_ids.device)
