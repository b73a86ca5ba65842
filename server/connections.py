"""Bounds on a connection's header phase, which uvicorn leaves open: time and bytes before a request's headers end.

uvicorn arms its keep-alive timeout only after a response, and never bounds the headers: a connection that sends
nothing (a port scan, a client that died before its request), or part of a request line or of its headers (a client
gone without a FIN, a slow-loris), held its descriptor and its buffers for the life of the process; and the
httptools parser buffers a header of any size (one 200 MB header: +280 MB of server RSS, no answer). The app never
sees such a connection (the ASGI call starts once the headers are complete), so neither ``BodyLimit`` nor the
admission limit can help.

:func:`guarded_protocol` wraps uvicorn's HTTP protocol class: from the moment a connection opens, and on a kept-alive
connection from the first byte of its next request (it may stay idle ``idle_timeout`` seconds after an answer, then
it is closed), the request's line and headers must arrive within ``timeout`` seconds (else: closed, with 408
``header_timeout`` if any of them had arrived) and within ``max_bytes`` bytes (else: 431 ``headers_too_large``,
closed). The bytes are counted as they are read, before the parser sees them: a header section that arrives whole
in one read (at most asyncio's 256 KiB) is parsed and passes (h11 too: ``certserve serve`` raises its own 16 KiB
limit to ``max_bytes``), so what this bounds is what a connection can make the server buffer, not every header
section's size. These answers, and 400 ``bad_request`` for bytes uvicorn's parser refuses (its own is plain text),
use the JSON error envelope (no request id: there was no request yet). ``on_reject(code)`` is called for each (metrics).

Two more ways past the app's limits, both closed here as well. A client that never reads its answers: uvicorn waits
for its write buffer to drain without a time limit, so such a connection held its request (and, for /certify, its
admission slot: CERTSERVE_MAX_INFLIGHT_REQUESTS such connections refused everyone else 503 inflight_limit) for the
life of the process; now a connection whose answer makes no progress for ``timeout`` seconds (writing paused, or
unsent bytes left when it is closed) is aborted. And a chunked body's trailer section: httptools buffers it (by
repeated bytes concatenation, on the event loop) and it is neither body (BodyLimit) nor headers, so one connection's
160 MB trailer took 31 s of the event loop and +289 MB; now more than ``max_bytes`` of it is 431 ``headers_too_large``.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

try:  # the socket's send queue (server.connections._unsent); not on Windows
    import fcntl
    import termios
except ImportError:  # pragma: no cover
    pass

from server.errors import ANSWERED_BY_CONNECTION, error_bytes

#: the request line and headers of one request may take at most this many bytes (nginx: 4 x 8 KiB; h11: 16 KiB)
MAX_HEADER_BYTES = 64 * 1024
_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def guarded_protocol(base: type[asyncio.Protocol], *, timeout: float, idle_timeout: float | None = None,
                     max_bytes: int = MAX_HEADER_BYTES,
                     on_reject: Callable[[str], None] | None = None) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's HTTP protocol ``base`` (httptools or h11) that bounds each request's header phase.
    ``idle_timeout`` (default ``timeout``): how long a connection may stay idle after an answer (keep-alive) before
    the first byte of its next request; from that byte its line and headers have ``timeout`` seconds."""
    idle_timeout = timeout if idle_timeout is None else idle_timeout
    import h11  # uvicorn's dependency
    from uvicorn.protocols.http.h11_impl import H11Protocol

    h11_based = issubclass(base, H11Protocol)

    class HeaderGuard(base):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None
        _header_bytes = 0
        _message_done = True  # httptools: the current request's body has been received (or there is no request)
        _write_timer: asyncio.TimerHandle | None = None  # an answer that makes no progress is aborted then
        _aborted = False
        _running = None  # httptools: the request whose app runs (self.cycle is the last one parsed, when pipelined)
        _chunk_open = False  # httptools: a chunk header came and neither its data nor its end yet (the last chunk's
        _body_events = 0  # header precedes the trailer section); on_body / on_chunk_complete calls
        _trailer_bytes = 0  # bytes received while only trailer fields (or the last chunk's header) can be arriving
        _write_left = 0  # the unsent bytes when the write timer was armed (fewer at its expiry: progress, re-armed)
        _idle = False  # the header timer is the keep-alive wait (idle_timeout) for the first byte of the next request
        _begun = False  # httptools: the parser has begun a request whose headers are not complete yet
        _refused_later: tuple | None = None  # httptools: (status, code, message) of bytes refused (malformed, or
        # headers beyond max_bytes) after a request still unanswered: answered once every earlier one is

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._await_headers()

        def connection_lost(self, exc) -> None:
            self._stop_timer()
            self._stop_write_timer()
            running = self._running
            if running is not None and running is not self.cycle and not running.response_complete:
                # httptools, pipelined: uvicorn marks only the last request parsed (self.cycle) disconnected; the
                # one whose app runs would wait for a disconnect that never comes, then write to the closed
                # transport (a RuntimeError: a 500 logged and counted)
                running.disconnected = True
                running.message_event.set()
            super().connection_lost(exc)

        def _start_asgi_task(self, cycle, app) -> None:  # httptools: also a pipelined request, once its turn comes
            self._running = cycle
            super()._start_asgi_task(cycle, app)

        def pause_writing(self) -> None:  # the transport's buffer is above its high-water mark: the client does not
            super().pause_writing()  # read; it has ``timeout`` seconds to read enough to resume writing
            self._stop_write_timer()
            self._abort_unless_drained()

        def resume_writing(self) -> None:
            self._stop_write_timer()
            if not self._aborted:  # uvloop resumes an aborted transport before connection_lost: the app's send()
                super().resume_writing()  # would then write to a closed transport (a RuntimeError, a 500 logged)

        def _write_stalled(self) -> None:
            self._write_timer = None
            if not self.transport.get_write_buffer_size():
                return  # drained (what the socket still holds is TCP's to deliver)
            if self._unsent() < self._write_left:  # the client took some of it: progress, wait again
                self._abort_unless_drained()
            else:
                self._abort()

        def _unsent(self) -> int:
            """Bytes the client has not taken: the transport's buffer, and the socket's send queue (Linux: what the
            kernel holds unacknowledged; megabytes, and the transport's buffer moves only when much of it is gone)."""
            left = self.transport.get_write_buffer_size()
            try:
                sock = self.transport.get_extra_info("socket")
                return left + struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
            except (AttributeError, NameError, OSError, ValueError, struct.error):
                return left

        def _abort(self) -> None:
            """Drop the connection now (close() would wait for the write buffer to drain, i.e. forever);
            connection_lost then marks the request disconnected and wakes its send(): the app's request ends."""
            self._stop_timer()
            self._aborted = True
            self.transport.abort()

        def _stop_write_timer(self) -> None:
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None

        def _close(self) -> None:
            """Close the connection; where answers are still unsent (a client that does not read), abort it unless
            they drain within ``timeout`` seconds (asyncio's close() waits for the buffer without a limit)."""
            self.transport.close()
            if self.transport.get_write_buffer_size():
                self._abort_unless_drained()

        def timeout_keep_alive_handler(self) -> None:  # uvicorn's keep-alive timer closes an idle connection
            super().timeout_keep_alive_handler()
            if self.transport.is_closing() and self.transport.get_write_buffer_size():
                self._abort_unless_drained()

        def _abort_unless_drained(self) -> None:
            """Abort once ``timeout`` seconds pass in which the client takes none of the unsent bytes (any taken
            re-arm it, as nginx's send_timeout: a slow but steady reader of a large answer is not cut off)."""
            if self._write_timer is None:
                self._write_left = self._unsent()
                self._write_timer = asyncio.get_running_loop().call_later(timeout, self._write_stalled)

        def data_received(self, data: bytes) -> None:
            if self._refused_later is not None:  # the parser refused earlier bytes: nothing after them is read
                return
            if self._idle and self._header_timer is not None:  # the next request's first bytes: its line and
                self._await_headers()  # headers have ``timeout`` from now (no longer the keep-alive wait)
            waiting = self._header_timer is not None
            # bytes that can only be request lines and headers: while the timer runs, and (httptools) once the
            # current request's body is in, also while its answer is computed (the parser buffers the next request's
            # headers then; h11 pauses reading instead)
            if waiting or not h11_based and self._message_done:
                self._header_bytes += len(data)
            in_trailer, body_events = self._chunk_open, self._body_events
            super().data_received(data)
            if self.transport.is_closing():
                return
            if not h11_based and not self._message_done and self._chunk_open:
                # httptools buffers trailer fields whole (h11 bounds them itself): all of ``data`` was trailer where
                # no chunk data or end came during it; else the trailer started within it (counted from the next)
                whole = in_trailer and self._body_events == body_events
                self._trailer_bytes = self._trailer_bytes + len(data) if whole else 0
                if self._trailer_bytes > max_bytes:
                    if self.cycle is not None and self.cycle.response_started:  # answered already: just close
                        self._abort()
                    else:
                        self._refuse(431, "headers_too_large", f"the chunked body's trailer section exceeds "
                                     f"{max_bytes} bytes")
                    return
            if waiting and not self._awaiting():  # a request's headers are complete: the app has it (BodyLimit times
                self._stop_timer()  # its body)
                self._header_bytes = 0
            elif not waiting and self._awaiting():  # the rest of a body answered early (413, 401, ...) has arrived
                self._await_headers(idle=True)
            in_headers = self._header_timer is not None if h11_based else self._message_done
            if in_headers and self._header_bytes > max_bytes:
                refusal = (431, "headers_too_large", f"the request line and headers exceed {max_bytes} bytes")
                if self._earlier_unanswered():  # httptools: a pipelined request's headers, while an earlier answer
                    self._hold(refusal)  # is pending (its client would read the 431 as that answer)
                else:
                    self._refuse(*refusal)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing() and self.transport.get_write_buffer_size():
                # the answer closed the connection (Connection: close, HTTP/1.0) with its rest unsent below the
                # high-water mark (writing never paused): close() would wait for the client without a limit
                self._abort_unless_drained()
            if self._refused_later is not None:  # the refused bytes' 400, once every earlier request is answered
                running = self._running
                if not self.transport.is_closing() and not self.pipeline and running.response_complete:
                    self._unset_keepalive_if_required()
                    self._refuse(*self._refused_later)
                return
            if not self.transport.is_closing() and self._awaiting():  # idle again (not a pipelined request)
                self._await_headers(idle=True)

        def on_message_begin(self) -> None:  # httptools: a request's first byte was parsed (h11: its buffer says it)
            self._begun = True
            super().on_message_begin()

        def on_headers_complete(self) -> None:  # httptools (h11 has no such callback: its state says it)
            self._message_done, self._header_bytes, self._begun = False, 0, False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._message_done, self._chunk_open, self._trailer_bytes = True, False, 0
            super().on_message_complete()

        def on_chunk_header(self) -> None:  # httptools only (h11 has no such callback)
            self._chunk_open = True

        def on_chunk_complete(self) -> None:
            self._chunk_open, self._body_events = False, self._body_events + 1

        def on_body(self, body: bytes) -> None:
            self._chunk_open, self._body_events = False, self._body_events + 1
            super().on_body(body)

        def send_400_response(self, msg: str) -> None:
            """uvicorn's answer to bytes its parser refuses (a malformed request line, header or chunked body): the
            JSON envelope and what was expected, instead of its plain-text 'Invalid HTTP request received.'; only
            the connection is closed where an answer is already being sent (a second one would corrupt it). httptools
            parses pipelined requests ahead: where an earlier request on the connection is still unanswered (running,
            or queued in ``pipeline``), its client would read the 400 as the answer to its valid request, so the 400
            is written after the earlier answers (as h11 does: it parses the next request only then), reading stops,
            and a queued request whose own body was refused is never run (the 400 is its answer)."""
            if self._refused_later is not None:
                return
            if h11_based and self._header_timer is not None and self._header_bytes > max_bytes:
                # h11's own bound on an unfinished request head (h11_max_incomplete_event_size: the same max_bytes)
                # refused it before this guard counted it: too large, not malformed
                self._refuse(431, "headers_too_large", f"the request line and headers exceed {max_bytes} bytes")
                return
            cycle = self.cycle
            if not h11_based:
                queued, running = self.pipeline, self._running
                if queued and queued[0][0] is cycle and not self._message_done:
                    queued.popleft()  # the refused bytes are the body of the last request queued
                if queued or (running is not None and not running.response_complete
                              and (running is not cycle or self._message_done)):
                    self._hold(self._bad_request(msg))
                    return
            if cycle is not None and cycle.response_started and not cycle.response_complete:
                self._stop_timer()
                self._close()
                return
            self._refuse(*self._bad_request(msg))

        @staticmethod
        def _bad_request(msg: str) -> tuple:
            return (400, "bad_request", "the request is not valid HTTP/1.1: a malformed request line, header (e.g. a "
                    "Content-Length that is not one decimal number) or chunked body; send a well-formed request "
                    f"({msg.rstrip('.')})")

        def _earlier_unanswered(self) -> bool:
            """httptools: a request parsed before the bytes now arriving is still unanswered (its app runs, or it is
            queued in ``pipeline``)."""
            running = self._running
            return not h11_based and bool(self.pipeline or running is not None and not running.response_complete)

        def _hold(self, refusal: tuple) -> None:
            """Answer ``refusal`` (status, code, message) once every earlier request is answered (on_response_complete:
            written now, its client would read it as the answer to its earlier, valid request); read nothing more."""
            self._stop_timer()
            self._refused_later = refusal
            self.flow.pause_reading()

        def _awaiting(self) -> bool:
            """Between requests: the last response sent and the last request's body received (an answer sent before
            the body was read leaves its rest still arriving: that is body, timed by the client, not headers)."""
            if self.cycle is None:
                return True
            if not self.cycle.response_complete:
                return False
            if h11_based:
                return self.conn.their_state is h11.IDLE
            return self._message_done

        def _await_headers(self, idle: bool = False) -> None:
            """Arm the header timer: ``timeout``, or after an answer with nothing of the next request in yet, the
            keep-alive wait ``idle_timeout``."""
            self._stop_timer()  # _header_bytes: counted since the last headers ended (part of the next may be in)
            if idle and not self._header_bytes:  # bytes of the next request read uncounted (with a body's rest, or
                # h11: during the answer) are no idle wait: the header limit, and a 408 at its end
                self._header_bytes = len(self.conn.trailing_data[0]) if h11_based else int(self._begun)
            self._idle = idle and not self._header_bytes
            wait = idle_timeout if self._idle else timeout
            self._header_timer = asyncio.get_running_loop().call_later(wait, self._expired)

        def _stop_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or not self._awaiting():
                return
            if self._header_bytes:  # part of a request came: say why it ends (an idle connection just closes)
                self._refuse(408, "header_timeout", f"the request line and headers did not arrive within {timeout:g} s")
            else:
                self._close()

        def _refuse(self, status: int, code: str, message: str) -> None:
            self._stop_timer()
            if on_reject is not None:
                on_reject(code)
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:  # this answers a request whose app runs (its body
                # refused): the app then sees a disconnect, not its client's; its error is not counted a second time
                cycle.scope.setdefault("state", {})[ANSWERED_BY_CONNECTION] = code
            body = error_bytes(code, message, None)
            head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % (
                status, _REASONS[status], len(body))
            self.transport.write(head + b"connection: close\r\n\r\n" + body)
            self._close()

    HeaderGuard.__name__ = HeaderGuard.__qualname__ = f"HeaderGuard{base.__name__}"
    return HeaderGuard
