"""One HTTP/1.1 keep-alive connection for small ranged GETs: what HttpSource needs and no more.

A GET here is one sendall of request bytes built once per connection but for the Range line,
one or a few recv() for the status line and headers (parsed into a dict, nothing else), and
recv_into straight into the caller's buffer for the rest of a body framed by Content-Length.
With http.client, which this replaces, a 4 KiB miss took about twice as long
(docs/performance.md, "Remote base").

Only bodies framed by Content-Length are read (a 206 always is from the servers we know); an
answer that is malformed or framed otherwise is a WireError. Interim answers (1xx, such as 103
Early Hints) are skipped. A connection is reused only after its body was read to the end and the
server did not say it would close. Besides the timeout of each wait for bytes, a request may
have a deadline for its whole answer: a server that trickles a byte now and then must not hold a
read for ever.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import ssl
import time

HEAD_MAX = 64 * 1024  # status line and headers together, at most
HEAD_RECV = 4096  # one recv for the head; most of a body stays in the kernel for recv_into
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([^\r\n]*))?")
_HEADER_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class WireError(Exception):
    """The server's answer is not HTTP/1.x as this client reads it."""


class ClosedError(WireError):
    """The server closed the connection before the first byte of an answer."""


@dataclasses.dataclass(frozen=True)
class ResponseHead:
    status: int
    reason: str
    headers: dict[str, str]  # lower-case names; a repeated header's values joined with ", "
    keep_alive: bool  # the server keeps the connection open after this answer

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)


def parse_head(head: bytes) -> ResponseHead:
    """The status line and header fields of an answer, `head` ending before the blank line."""
    status_line, *fields = head.split(b"\r\n")
    match = _STATUS_LINE.fullmatch(status_line)
    if match is None:
        raise WireError(f"a malformed status line {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for field in fields:
        name, colon, value = field.partition(b":")
        if not colon or _HEADER_NAME.fullmatch(name) is None:
            raise WireError(f"a malformed header line {field[:80]!r}")
        key, text = name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    tokens = {token.strip() for token in headers.get("connection", "").lower().split(",")}
    keep_alive = "close" not in tokens and (match[1] == b"1" or "keep-alive" in tokens)
    return ResponseHead(int(match[2]), (match[3] or b"").decode("latin-1"), headers, keep_alive)


def content_length(head: ResponseHead) -> int:
    """The body's length from Content-Length; WireError for a body framed otherwise."""
    if head.header("Transfer-Encoding") is not None:
        raise WireError(f"a body in Transfer-Encoding {head.header('Transfer-Encoding')!r}, not framed by "
                        "Content-Length")
    value = head.header("Content-Length")
    if value is None or not value.isdigit():
        raise WireError(f"a body without a usable Content-Length ({value!r})")
    return int(value)


class Connection:
    """A connection to host:port, opened at its first request; used by one thread at a time."""

    def __init__(self, host: str, port: int, timeout: float, tls: ssl.SSLContext | None):
        self.host, self.port, self.timeout, self.tls = host, port, timeout, tls
        self.reusable = False  # the last answer was read to its end on a kept-alive connection
        self._sock: socket.socket | None = None
        self.body_length = 0  # of the last 206 answer, from its Content-Length
        self._buffered = memoryview(b"")  # body bytes that came with the head
        self._body_left = 0
        self._keep_alive = False
        self._deadline: float | None = None  # time.monotonic() by which the answer must be in

    def get_range(self, request_head: bytes, first: int, last: int, deadline: float | None = None) -> ResponseHead:
        """Send `request_head` (the request line and every header but Range, each ending in
        CRLF) with Range: bytes=first-last; the answer's head. A 206's body (of
        body_length bytes) is read with readinto(); no other body is read. Past `deadline`
        (time.monotonic()), a wait for more of the answer raises TimeoutError."""
        self._deadline = deadline
        if self._sock is None:
            self._sock = self._open()
        self.reusable = False
        self._limit_wait()
        self._sock.sendall(b"%sRange: bytes=%d-%d\r\n\r\n" % (request_head, first, last))
        head, rest = self._receive_head(b"")
        response = parse_head(head)
        while response.status // 100 == 1 and response.status != 101:  # an interim answer: the real one follows
            head, rest = self._receive_head(rest)
            response = parse_head(head)
        self._body_left = self.body_length = content_length(response) if response.status == 206 else 0
        self._buffered = memoryview(rest)[: self._body_left]
        self._keep_alive = response.keep_alive
        return response

    def readinto(self, view: memoryview) -> int:
        """Up to len(view) more bytes of the body (0 at its end, or when the server closed)."""
        want = min(len(view), self._body_left)
        if not want:
            return 0
        if self._buffered:
            n = min(want, len(self._buffered))
            view[:n] = self._buffered[:n]
            self._buffered = self._buffered[n:]
        else:
            self._limit_wait()
            n = self._sock.recv_into(view, want)
            if not n:
                return 0
        self._body_left -= n
        self.reusable = not self._body_left and self._keep_alive
        return n

    def close(self) -> None:
        self.reusable = False
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _open(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                return self.tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        return sock

    def _limit_wait(self) -> None:
        """The next wait on the socket ends at the timeout or the deadline, whichever comes
        first (settimeout costs one ioctl, against the poll and recv of every wait)."""
        timeout = self.timeout
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out")
            timeout = min(timeout, left)
        self._sock.settimeout(timeout)

    def _receive_head(self, received: bytes) -> tuple[bytes, bytes]:
        """(the head without its blank line, what came after it), `received` already there."""
        scanned = 0  # the blank line is not in received[:scanned]
        while True:
            end = received.find(b"\r\n\r\n", max(0, scanned - 3))
            if end >= 0:
                return received[:end], received[end + 4 :]
            if len(received) > HEAD_MAX:
                raise WireError(f"an answer's headers longer than {HEAD_MAX} bytes")
            scanned = len(received)
            self._limit_wait()
            chunk = self._sock.recv(HEAD_RECV)
            if not chunk:
                if not received:
                    raise ClosedError("the server closed the connection without answering")
                raise WireError("the server closed the connection in the middle of an answer's headers")
            received += chunk
