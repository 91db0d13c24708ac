"""The log: one line per event, as text or as JSON objects whose keys match SHOW CLIENTS ids (`log.format`).

What clients send (user and database names, application names, their statements in errors) is logged as it
came, but a line of text stays one line: line breaks and other control characters in a message are escaped, so
that no client can forge a line (JSON escapes them itself)."""

from __future__ import annotations

import json
import logging
import sys
import time

# Fields an event's log call may pass with extra={...}: JSON lines carry them as keys of their own.
LOG_FIELDS = ("event", "client", "user", "shard", "node", "seconds", "reason", "worker")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        entry.update((key, getattr(record, key)) for key in LOG_FIELDS if hasattr(record, key))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


# C0 and C1 controls, DEL, and the Unicode line and paragraph separators, which some readers break lines at.
_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}
_CONTROLS.update({0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029"})


class _TextFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:  # the message: a traceback follows it as it is
        return super().formatMessage(record).translate(_CONTROLS)


def setup_logging(level: str, fmt: str, worker: int | None = None) -> None:
    """A worker's lines carry its id (a `worker` key in JSON), as they share the supervisor's stderr."""
    handler = logging.StreamHandler(sys.stderr)
    if worker is not None:

        def tag(record: logging.LogRecord) -> bool:
            record.worker = worker
            return True

        handler.addFilter(tag)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        name = "%(name)s" if worker is None else "%(name)s[%(worker)s]"
        handler.setFormatter(_TextFormatter(f"%(asctime)s %(levelname)s {name}: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
