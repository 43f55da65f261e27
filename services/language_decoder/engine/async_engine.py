"""`AsyncEngine`: the `LLMEngine` driven by a background thread, streamed to asyncio callers.

The thread runs steps while there is work and sleeps otherwise. Callers never touch the engine: new
sequences and aborts go through a small locked inbox that the thread drains before every step, so
an abort (a closed or cancelled stream, an expired deadline) takes effect before the next step runs
and its blocks are free by then. Outputs go back through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable

from .engine import LLMEngine
from .errors import EngineClosed, QueueFull, RequestFailed
from .request import EngineOutput, EngineRequest, PrefixHold
from .sequence import Sequence

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_step: Callable[[bool], None] = lambda ok: None) -> None:
        self.engine = engine
        self._on_step = on_step  # told after each step whether its model call worked (engine health)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._new: list[tuple[Sequence, PrefixHold | None]] = []
        self._aborts: list[str] = []
        # Work for the engine thread besides sequences: (function of the engine, loop, future or None).
        self._calls: list[tuple[Callable[[LLMEngine], object], asyncio.AbstractEventLoop | None,
                                asyncio.Future | None]] = []
        # request id -> (its sequence, the caller's loop, its queue). Outputs are matched by sequence,
        # not only by id: an id may be reused while the old sequence's last step is still running.
        self._streams: dict[str, tuple[Sequence, asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._closed = False
        self._thread: threading.Thread | None = None

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Stream a request's outputs; the last one has `finished=True`, `finish_reason` and `usage`.

        Raises (on the first iteration) PromptTooLong or ValueError for a bad request, QueueFull when
        the admission queue is full, EngineClosed after `close()`, and RequestFailed if the model
        step carrying the request failed. Closing the iterator early (`aclose()`, `break` followed
        by garbage collection, or cancelling the task that awaits it) aborts the request.
        """
        seq = self.engine.make_sequence(request)
        rid = seq.request_id
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._closed:
                raise EngineClosed("the decoder engine is shut down")
            if rid in self._streams:
                raise ValueError(f"request id {rid!r} is already running")
            if len(self.engine.scheduler.waiting) + len(self._new) >= self.engine.config.max_queue_size:
                raise QueueFull(
                    f"the decoder queue is full ({self.engine.config.max_queue_size} requests waiting)"
                )
            self._new.append((seq, request.prefix_hold))
            self._streams[rid] = (seq, loop, queue)
            self._start_locked()
        self._wake.set()
        done = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                if item.finished:
                    done = True
                    if item.finish_reason == "error":
                        raise RequestFailed(item.error or "the decoder step failed")
                yield item
                if done:
                    return
        finally:
            if not done:
                with self._lock:
                    mine = self._streams.get(rid, (None,))[0] is seq
                    if mine:  # else the engine already finished it (its final output went unread)
                        del self._streams[rid]
                        self._aborts.append(rid)
                self._wake.set()

    async def hold_prefix(self, request: EngineRequest) -> PrefixHold:
        """`LLMEngine.hold_prefix` on the engine thread. Pass the hold on in the request, or give it
        back with `release_hold` (a hold left behind pins its blocks for good)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._call(lambda engine: engine.hold_prefix(request), loop, future)
        return await future

    def release_hold(self, hold: PrefixHold) -> None:
        """Unpin a hold no request took over (thread-safe, returns at once; idempotent)."""
        self._call(lambda engine: engine.release_hold(hold), None, None)

    def _call(self, fn: Callable[[LLMEngine], object], loop: asyncio.AbstractEventLoop | None,
              future: asyncio.Future | None) -> None:
        with self._lock:
            if self._closed:
                if future is not None:
                    future.set_exception(EngineClosed("the decoder engine is shut down"))
                return
            self._calls.append((fn, loop, future))
            self._start_locked()
        self._wake.set()

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the thread after its current step; pending streams fail with EngineClosed."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._wake.set()
        if thread is not None:
            thread.join(timeout)
        with self._lock:
            streams, self._streams = self._streams, {}
            self._new.clear()
            calls, self._calls = self._calls, []
        for _, loop, future in calls:
            if future is not None:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._settle, future, future.set_exception,
                                              EngineClosed("the decoder engine shut down"))
        for rid in list(self.engine.sequences):
            self.engine.abort(rid)
        for _, loop, queue in streams.values():
            self._put(loop, queue, EngineClosed("the decoder engine shut down"))

    @property
    def num_active(self) -> int:
        with self._lock:
            return len(self._streams)

    # ------------------------------------------------------------------ engine thread

    def _start_locked(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="decoder-engine", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        engine = self.engine
        while True:
            self._wake.clear()
            with self._lock:
                if self._closed:
                    return
                new, self._new = self._new, []
                aborts, self._aborts = self._aborts, []
                calls, self._calls = self._calls, []
            # Aborts first: a request id freed by a cancelled stream may come back at once.
            for rid in aborts:
                engine.abort(rid)
            for fn, loop, future in calls:
                self._run_call(engine, fn, loop, future)
            for seq, hold in new:
                with self._lock:
                    listening = self._streams.get(seq.request_id, (None,))[0] is seq
                try:
                    if not listening:  # cancelled before the engine saw it
                        continue
                    engine.enqueue(seq, hold)
                except Exception as exc:  # e.g. QueueFull after preemptions refilled the queue
                    self._deliver(seq, exc)
                finally:
                    if hold is not None:
                        engine.release_hold(hold)  # a no-op once the sequence took it over
            if not engine.has_unfinished():
                self._wake.wait()
                continue
            running = dict(engine.sequences)  # who produced each output of this step
            steps, failed = engine.stats.steps, engine.stats.failed_steps
            try:
                outputs = engine.step()
            except Exception as exc:  # a bug outside the model call: fail everything, keep serving
                log.exception("decoder engine step crashed")
                self._on_step(False)
                for rid, seq in running.items():
                    engine.abort(rid)
                    self._deliver(seq, RequestFailed(f"{type(exc).__name__}: {exc}"))
                continue
            if engine.stats.steps != steps:  # a model call ran
                self._on_step(engine.stats.failed_steps == failed)
            for out in outputs:
                self._deliver(running[out.request_id], out)

    def _run_call(self, engine: LLMEngine, fn, loop, future) -> None:
        try:
            result = fn(engine)
        except Exception as exc:
            if future is None:
                log.exception("decoder engine call failed")
                return
            result = exc
        if future is not None:
            setter = future.set_exception if isinstance(result, BaseException) else future.set_result
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed
                loop.call_soon_threadsafe(self._settle, future, setter, result)

    def _settle(self, future: asyncio.Future, setter, result) -> None:
        """Set a call's result; a hold made for a caller that went away (cancelled) is given back."""
        if not future.done():
            setter(result)
        elif isinstance(result, PrefixHold):
            self.release_hold(result)

    def _deliver(self, seq: Sequence, item: EngineOutput | BaseException) -> None:
        """Hand `item` to the stream of `seq` (if it still listens); a final item closes the stream."""
        final = not isinstance(item, EngineOutput) or item.finished
        with self._lock:
            entry = self._streams.get(seq.request_id)
            if entry is None or entry[0] is not seq:
                return
            if final:
                del self._streams[seq.request_id]
        self._put(entry[1], entry[2], item)

    @staticmethod
    def _put(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item: object) -> None:
        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody listens any more
            loop.call_soon_threadsafe(queue.put_nowait, item)
