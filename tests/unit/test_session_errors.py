"""How a failed session-store call is classified: full (nothing lost, RESOURCE_EXHAUSTED) or unavailable."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ResponseError

from gateway.sessions import SessionStoreFull, SessionStoreUnavailable, classify_error


@pytest.mark.parametrize("error", [
    OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
    # Older servers wrap a refused write inside a Lua script in a generic script error.
    ResponseError("Error running script (call to f_1): @user_script:20: OOM command not allowed when used memory > "
                  "'maxmemory'"),
])
def test_out_of_memory_is_full(error: Exception) -> None:
    classified = classify_error("append", error)
    assert isinstance(classified, SessionStoreFull)
    assert "append was refused" in str(classified) and "intact" in str(classified)


@pytest.mark.parametrize("error", [
    RedisConnectionError("Connection refused"), asyncio.TimeoutError(), OSError("unreachable"),
    ResponseError("MISCONF Errors writing to the AOF file: No space left on device"),
])
def test_anything_else_is_unavailable(error: Exception) -> None:
    classified = classify_error("get", error)
    assert isinstance(classified, SessionStoreUnavailable) and "session store: get failed" in str(classified)
