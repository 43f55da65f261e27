"""Log lines as text or JSON, carrying the request id of the call that wrote them."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from services.common.logging import configure_logging, request_id_var


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])


def test_json_lines_with_request_id_and_exception(restore_root_logger) -> None:
    buf = io.StringIO()
    configure_logging("DEBUG", "json", stream=buf)
    log = logging.getLogger("svc")
    log.info("outside any call")

    async def call(rid: str) -> None:
        request_id_var.set(rid)
        await asyncio.to_thread(log.debug, "in a worker thread of %s", rid)
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")

    async def main():
        await asyncio.gather(asyncio.ensure_future(call("r-1")), asyncio.ensure_future(call("r-2")))

    asyncio.run(main())
    lines = [e for e in map(json.loads, buf.getvalue().splitlines()) if e["logger"] == "svc"]
    assert lines[0]["message"] == "outside any call" and "request_id" not in lines[0]
    assert {(e["request_id"], e["message"]) for e in lines[1:] if e["level"] == "DEBUG"} == {
        ("r-1", "in a worker thread of r-1"), ("r-2", "in a worker thread of r-2")}
    failed = [e for e in lines if e["message"] == "failed"]
    assert len(failed) == 2 and all("ValueError: boom" in e["exception"] for e in failed)
    assert all({"ts", "level", "logger"} <= e.keys() for e in lines)
    assert request_id_var.get() == ""  # tasks' ids never leak into their creator


def test_text_format_shows_the_request_id(restore_root_logger) -> None:
    buf = io.StringIO()
    configure_logging("INFO", "text", stream=buf)
    logging.getLogger("svc").info("plain")
    token = request_id_var.set("abc123")
    try:
        logging.getLogger("svc").info("tagged")
    finally:
        request_id_var.reset(token)
    plain, tagged = buf.getvalue().splitlines()
    assert plain.endswith("INFO svc: plain")
    assert tagged.endswith("INFO svc [abc123]: tagged")


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="text, json"):
        configure_logging("INFO", "xml")
