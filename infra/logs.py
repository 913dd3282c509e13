"""Log lines: text (the default) or JSON lines (`JETSOURCE_LOG_FORMAT=json`), each with the
process's role and, where the work being done belongs to a trace, its trace and correlation ids
(`bus.tracing`)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from bus import tracing


class JsonLines(logging.Formatter):
    """One JSON object per line: time, level, role, logger, message, trace_id, correlation_id,
    and the exception's traceback when there is one."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self._role = role

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "role": self._role,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if (trace := tracing.CURRENT.get()) is not None:
            line["trace_id"], line["correlation_id"] = trace
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class TextLines(logging.Formatter):
    """`time level role logger: message [trace=… correlation=…]`."""

    def __init__(self, role: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {role} %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if (trace := tracing.CURRENT.get()) is not None:
            trace_id, correlation_id = trace
            text += f" [trace={trace_id}" + (f" correlation={correlation_id}]" if correlation_id != trace_id else "]")
        return text


def setup(level: str, log_format: str, role: str) -> None:
    """The root logger writes to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines(role) if log_format == "json" else TextLines(role))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
