"""Each video of a request encoded at most once, however many of its frames the feature cache lost."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from gateway.feature_cache import Entry


class VideoEncodes:
    """One request's video encodes, by the key of the video's first frame (bytes + sampling + tiling)."""

    def __init__(self) -> None:
        self._frames: dict[str, asyncio.Future[list[Entry]]] = {}

    def encoded(self, video_key: str) -> bool:
        """Whether this request already encoded (or is encoding) the video."""
        return video_key in self._frames

    async def frames(self, video_key: str, encode: Callable[[], Awaitable[list[Entry]]]) -> list[Entry]:
        """Every sampled frame's features; `encode` runs once per video, concurrent callers share it."""
        task = self._frames.get(video_key)
        if task is None:
            task = self._frames[video_key] = asyncio.ensure_future(encode())
        return await asyncio.shield(task)

    def close(self) -> None:
        """Cancel encodes nobody waits for any more (the request ended)."""
        for task in self._frames.values():
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()  # retrieved: a failure every caller already saw is not "never retrieved"
