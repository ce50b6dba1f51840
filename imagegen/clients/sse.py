"""Server-sent events (`text/event-stream`): the bytes of PocketBase's realtime stream turned into events.

Only the rules the watcher needs, after the WHATWG definition: lines end in LF, CRLF or CR; `field:value`
lines build an event (`data` lines join with LF); an empty line sends it; `:` starts a comment; unknown
fields are ignored. An event past a size cap is refused rather than buffered without end.
"""

from __future__ import annotations

from dataclasses import dataclass

from imagegen.errors import RealtimeError

# The largest event accepted (a record with long prompts is tens of KiB).
MAX_EVENT_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class ServerEvent:
    """One server-sent event."""

    event: str
    data: str
    id: str = ""


class SSEParser:
    """Turns the bytes of an event stream into events (the WHATWG `text/event-stream` rules we need).

    Lines end in LF, CRLF or CR; `field:value` lines build an event (`data` lines join with LF) and an empty
    line sends it; lines starting with `:` are comments; unknown fields are ignored."""

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = b""
        self._event = ""
        self._data: list[str] = []
        self._id = ""
        self._size = 0
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[ServerEvent]:
        """Take the next bytes; return the events they complete."""
        self._buffer += chunk
        events: list[ServerEvent] = []
        while True:
            cut = _line_end(self._buffer)
            if cut is None:
                break
            end, after = cut
            line = self._buffer[:end].decode("utf-8", errors="replace")
            self._buffer = self._buffer[after:]
            event = self._line(line)
            if event is not None:
                events.append(event)
        if len(self._buffer) + self._size > self._max:
            raise RealtimeError(f"an event of the realtime stream is larger than {self._max} bytes")
        return events

    def _line(self, line: str) -> ServerEvent | None:
        if not line:
            if not self._data and not self._event:
                return None
            event = ServerEvent(self._event or "message", "\n".join(self._data), self._id)
            self._event, self._data, self._size = "", [], 0
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        self._size += len(line)
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None


def _line_end(buffer: bytes) -> tuple[int, int] | None:
    """Where the first line ends and the next starts; None while no full line is there.

    A CR at the very end may be the first half of a CRLF, so it waits for the next byte."""
    lf, cr = buffer.find(b"\n"), buffer.find(b"\r")
    if cr == -1 or (lf != -1 and lf < cr):
        return None if lf == -1 else (lf, lf + 1)
    if cr + 1 == len(buffer):
        return None
    return cr, cr + (2 if buffer[cr + 1 : cr + 2] == b"\n" else 1)
