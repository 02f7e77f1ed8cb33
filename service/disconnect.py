"""Cancel a long route's work when its client goes away: queued and running inputs are freed, judge calls dropped.

Every long route (embeddings, rerank, refine-query, corpus uploads) awaits its work through `unless_disconnected`;
the app answers `ClientDisconnected` with 499 and counts it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The caller went away before its answer was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (the body must have been read already)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # its coalescer wait releases the inputs as the cancellation lands
    if not task.done():
        raise ClientDisconnected
    return task.result()
