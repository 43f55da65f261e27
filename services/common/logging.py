"""Process logging: text or JSON lines on stderr, every record tagged with the current request id.

The request id lives in a context variable that the request-id interceptor sets for each RPC, so
every log line written while serving a call (and in tasks and threads started from it with
`asyncio.to_thread`) carries it, with no logger having to pass it along.
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import json
import logging
import sys
from typing import TextIO

LOG_FORMATS = ("text", "json")

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_id_suffix)s: %(message)s"


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (and `request_id_suffix`, " [id]" or "", for the text format) to records."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = request_id_var.get()
        record.request_id = rid
        record.request_id_suffix = f" [{rid}]" if rid else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id (when set), exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", "")
        if rid:
            entry["request_id"] = rid
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Replace the root logger's handlers with one on `stream` (stderr) in `fmt` ("text" or "json")."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
