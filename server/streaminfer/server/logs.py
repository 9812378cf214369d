"""Log set-up: stream ids on stream lines, JSON lines on request, repeats limited.

Every module logs through ``logging.getLogger(__name__)``. While a Stream
call runs, its handler and reader tasks carry the stream id in
``STREAM_ID``, and each record of theirs gets it as ``stream_id``. The text
format shows it when the message does not already name the stream. Lines logged
elsewhere (decode and inference threads, callbacks they schedule) name their
stream in the message as ``stream <id>``, and the id is taken from there.
The JSON format has it as a field on every line that concerns a stream.

A line whose template repeats within ``REPEAT_WINDOW_S`` is logged at most
``REPEAT_LIMIT`` times in that window; the next line of that template after
the window reports how many were held back. Lines logged with
``extra=EVERY_TIME`` (the per-chunk lines the user asked for) are exempt.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import threading
import time
from typing import Any

STREAM_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("streaminfer_stream_id", default=None)
# Stream ids are 16 hex digits (Session.stream_id).
_STREAM_IN_MESSAGE = re.compile(r"\bstream ([0-9a-f]{16})\b")

REPEAT_WINDOW_S = 10.0
REPEAT_LIMIT = 5
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(stream_tag)s: %(message)s"
FORMATS = ("text", "json")
# Pass as ``extra`` for lines that must not be thinned out.
EVERY_TIME = {"repeat_ok": True}


class StreamIdFilter(logging.Filter):
    """Adds ``stream_id`` (None outside a stream) and ``stream_tag`` (" [id]" or "") to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        stream_id = STREAM_ID.get()
        message = record.getMessage()
        record.stream_tag = ""
        if stream_id is None:
            match = _STREAM_IN_MESSAGE.search(message)
            stream_id = match.group(1) if match else None
        elif stream_id not in message:
            record.stream_tag = f" [{stream_id}]"
        record.stream_id = stream_id
        return True


class RepeatLimiter(logging.Filter):
    """Passes at most ``limit`` records of one template per ``window_s``, then reports how many it held back."""

    def __init__(self, window_s: float = REPEAT_WINDOW_S, limit: int = REPEAT_LIMIT, clock: Any = time.monotonic) -> None:
        super().__init__()
        self._window_s = window_s
        self._limit = limit
        self._clock = clock
        self._lock = threading.Lock()
        # Template key -> [window start, passed in window, held back in window].
        self._seen: dict[tuple[str, int, str], list[Any]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "repeat_ok", False):
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is None or now - entry[0] >= self._window_s:
                held_back = entry[2] if entry is not None else 0
                self._seen[key] = [now, 1, 0]
                if len(self._seen) > 10_000:
                    self._forget_old(now)
                if held_back:
                    record.msg = f"{record.msg} [{held_back} more like this in the last {self._window_s:g} s were not logged]"
                return True
            if entry[1] < self._limit:
                entry[1] += 1
                return True
            entry[2] += 1
            return False

    def _forget_old(self, now: float) -> None:
        for key in [key for key, entry in self._seen.items() if now - entry[0] >= self._window_s]:
            del self._seen[key]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, stream_id, and the traceback when there is one."""

    def __init__(self, extra: dict[str, Any] | None = None) -> None:
        super().__init__()
        self._extra = extra or {}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self._extra,
        }
        stream_id = getattr(record, "stream_id", None)
        if stream_id is not None:
            entry["stream_id"] = stream_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str, log_format: str = "text", worker: int | None = None) -> None:
    """Send the process's logs to stderr at ``level``, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter({"worker": worker} if worker is not None else None))
    else:
        prefix = f"worker-{worker} " if worker is not None else ""
        handler.setFormatter(logging.Formatter(TEXT_FORMAT.replace("%(name)s", prefix + "%(name)s")))
    handler.addFilter(StreamIdFilter())
    handler.addFilter(RepeatLimiter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
