"""The epoch hand-off between a segment's ranks and the client, without a round of tasks.

A segment's ranks run as one long Dask task each, across epochs. At an
epoch's end rank 0 posts the epoch's result here (:func:`post`). The client
takes it with ``client.run(take, ...)``, a coroutine on the worker's event
loop that wakes as soon as it is posted, runs its epoch-end work (history,
validation, callbacks), and delivers its word on the next epoch to every
rank in the same ``client.run`` that takes the next epoch's result
(:func:`exchange`); the ranks, which ran on into that epoch meanwhile, look
for it (:func:`has_word`) and read it (:func:`wait_word`). A ``client.run``
round trip costs one to a few milliseconds; a round of Dask tasks (submit,
schedule, run, fetch the result) costs ten or more, which is several updates
of a small model.

Everything is keyed by the segment's token; a segment has at most one
result and one word in flight at a time."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

# How often a rank waiting for the client's word checks that it is still wanted.
WORD_POLL_S = 0.5

_lock = threading.Condition()
_results: dict[str, Any] = {}
_waiters: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
_words: dict[str, Any] = {}


def post(token: str, result: Any) -> None:
    """Leave a rank's result for the client (from the rank's thread)."""
    with _lock:
        _results[token] = result
        waiter = _waiters.pop(token, None)
    if waiter is not None:
        loop, future = waiter
        loop.call_soon_threadsafe(_wake, future)


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


async def take(token: str, timeout: float) -> Any:
    """The result posted for ``token``, waiting up to ``timeout`` seconds; None if none came."""
    loop = asyncio.get_running_loop()
    with _lock:
        if token in _results:
            return _results.pop(token)
        future = loop.create_future()
        _waiters[token] = (loop, future)
    try:
        await asyncio.wait_for(future, timeout)
    except asyncio.TimeoutError:
        pass
    with _lock:
        _waiters.pop(token, None)
        return _results.pop(token, None)


async def deliver(token: str, word: Any) -> None:
    """Give every rank of segment ``token`` on this worker the client's word."""
    with _lock:
        _words[token] = word
        _lock.notify_all()


async def exchange(token: str, word: Any, timeout: float, taker: str, dask_worker=None) -> Any:
    """:func:`deliver` ``word``, then, on the worker at address ``taker`` only, :func:`take`.

    The client's word on an epoch and its wait for that epoch's result in
    one round trip (``client.run`` hands the worker in as ``dask_worker``).
    """
    await deliver(token, word)
    if dask_worker is None or dask_worker.address != taker:
        return None
    return await take(token, timeout)


def has_word(token: str) -> bool:
    """Whether the client's word for segment ``token`` has arrived (a rank need not wait)."""
    return token in _words


def wait_word(token: str, given_up: Callable[[], bool]) -> Any:
    """The client's word for segment ``token`` (from a rank's thread).

    Waits as long as the client takes (its validation and callbacks may be
    long), but returns None, like an explicit end, once ``given_up()`` says
    the fit or this task was released: a client that went away must not
    hold the worker's thread.
    """
    with _lock:
        while token not in _words:
            if given_up():
                return None
            _lock.wait(WORD_POLL_S)
        return _words.pop(token)


def forget(prefix: str) -> None:
    """Drop every result and word of the segments whose tokens start with ``prefix``."""
    with _lock:
        for box in (_results, _words):
            for token in [t for t in box if t.startswith(prefix)]:
                del box[token]
        _lock.notify_all()
