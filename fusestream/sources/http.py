"""An image file on a web server or an object store, read by HTTP(S) byte ranges.

The client is http_wire's lean HTTP/1.1 connection, each driven by one thread at a time: a
request is prebuilt bytes and one sendall, the answer's head is parsed into a dict, and the
body is received straight into the caller's buffer. The standard library's http.client did the
same body receive, but its request building and email-based header parsing made a 4 KiB miss
take about twice as long (docs/performance.md, "Remote base"); urllib3 2.x copies every body
twice and used a quarter more CPU per GiB on loopback. The pooling, retries and checks that
matter here are this module's own either way.

Three lanes keep a guest read from queueing behind the stream:

* bulk: the stream's reads (any but ReadFor.GUEST), and reads of at least `request_size` bytes
  that are larger than any guest read can be (GUEST_READ_MAX), are cut at multiples of
  `request_size` and fetched in parallel by `connections` threads, straight into the caller's
  buffer, bypassing the cache; prefetch() of such a range (the stream's next step) fetches its
  pieces into buffers of their own that the read then takes over;
* guest: a smaller read is served from an LRU of recent blocks (`block_size`, aligned); the
  blocks it misses are fetched by the calling thread on connections of its own;
* prefetch: readahead for sequential guest reads and prefetch() hints, by threads of their own,
  into the cache; a read that needs a block already on its way waits for it.

Every answer is checked against what the server said at open (size, ETag or Last-Modified,
sent as If-Range): data of a changed object is never mixed in, a SourceError says so.
Connection errors, timeouts, truncated bodies, 5xx and 429 are retried with exponential backoff
and jitter (Retry-After honoured up to `retry_delay_max`) for at most `retry_time` seconds per
read; a connection that failed is dropped, so the source works again once the server is back.
An answer must also come in at STALLED_RATE on average (after `timeout` for its start): a server
that trickles a byte now and then times out like one that sends nothing.

Names: `name` is the URL without its userinfo and with every query value replaced by ***
(a presigned URL's signature lives there), so no credential reaches messages, status or logs.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import email.utils
import logging
import random
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TypeVar

from .. import ioprio
from ..errors import SourceError, UsageError
from .http_wire import Connection, ResponseHead, WireError
from .read_for import ReadFor

log = logging.getLogger(__name__)

KiB, MiB = 1 << 10, 1 << 20
DEFAULT_PORTS = {"http": 80, "https": 443}
REDACTED = "***"
USER_AGENT = "fusestream"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_T = TypeVar("_T")
Block = bytes | memoryview  # see _BlockCache
AHEAD_QUEUE_MAX = 4  # prefetch lane jobs queued per connection; further hints are dropped
GUEST_READ_MAX = 4 * MiB  # more than the kernel sends in one FUSE read (1 MiB): a guest read is never bulk
STALLED_RATE = 16 * KiB  # bytes/s: an answer slower than this on average (past `timeout`) has stalled
_URL_IN_TEXT = re.compile(r"https?://\S+", re.IGNORECASE)  # quotes too: a userinfo or query may hold them


@dataclasses.dataclass(frozen=True)
class HttpOptions:
    """How an HttpSource talks to its server (the remote layers' mount options)."""

    sslverify: bool = True  # QEMU curl's name; off logs a warning at open
    ca_file: str | None = None  # trust only this CA bundle instead of the system store
    allowed_origins: tuple[str, ...] | None = None  # scheme://host[:port] that may be contacted; None: any
    connections: int = 4  # bulk transfers in parallel
    timeout: float = 10.0  # seconds for a connect or any wait for bytes
    retry_time: float = 60.0  # seconds one read keeps retrying before it fails
    retry_delay_min: float = 0.1  # first backoff, doubled per retry
    retry_delay_max: float = 10.0  # longest backoff, and the cap on Retry-After
    block_size: int = 64 * KiB  # alignment and unit of cached reads
    request_size: int = 4 * MiB  # bulk reads are fetched in pieces of this size
    readahead: int = 1 * MiB  # fetched ahead of sequential small reads
    cache_size: int = 64 * MiB  # recent blocks kept in memory (0: none)

    def __post_init__(self) -> None:
        if self.block_size < 512 or self.block_size & (self.block_size - 1):
            raise UsageError(f"block_size {self.block_size}: must be a power of two of at least 512")
        if self.request_size < self.block_size or self.request_size % self.block_size:
            raise UsageError(f"request_size {self.request_size}: must be a multiple of block_size {self.block_size}")
        if not 1 <= self.connections <= 64:
            raise UsageError(f"connections {self.connections}: must be 1 to 64")
        if self.timeout <= 0 or self.retry_time < 0 or not 0 < self.retry_delay_min <= self.retry_delay_max:
            raise UsageError("timeout must be > 0, retry_time >= 0 and 0 < retry_delay_min <= retry_delay_max")
        if self.readahead < 0 or self.cache_size < 0:
            raise UsageError("readahead and cache_size must be >= 0")
        if not self.sslverify and self.ca_file:
            raise UsageError("ca_file and sslverify=off contradict each other")


def redact_url(url: str) -> str:
    """`url` as it may be shown: no userinfo, every query value replaced, no fragment. One that
    cannot be split (a bracket that does not close) shows as its scheme and *** alone. A
    password with an unencoded `/`, `?` or `#` splits as host and port (`https://KEY:ab/cd@h/x`:
    host KEY, port ab): where a host with a port is followed by an `@`, all before the last `@`
    is hidden."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return f"{url.partition(':')[0]}://{REDACTED}"
    if "@" not in parts.netloc and ":" in parts.netloc.rpartition("]")[2] and "@" in url.partition("://")[2]:
        after = url.rpartition("@")[2]
        return f"{parts.scheme}://{REDACTED}@" + redact_url(f"{parts.scheme}://{after}").partition("://")[2]
    netloc = parts.netloc.rpartition("@")[2]
    query = "&".join(f"{field.partition('=')[0]}={REDACTED}" if "=" in field else field
                     for field in parts.query.split("&") if field)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def redact_urls(text: str) -> str:
    """`text` with every http(s) URL in it redacted (see redact_url): for text a user wrote,
    such as a ctl command, that may name a URL with its credentials."""
    return _URL_IN_TEXT.sub(lambda match: redact_url(match[0]), text)


def split_url(url: str) -> urllib.parse.SplitResult:
    """urlsplit, its port checked: SourceError for a URL a hostile image may name that cannot
    name anything (a bracket that does not close, a port that is no number from 0 to 65535)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # its text quotes the host part, which may hold credentials
        raise SourceError(f"{redact_url(url)}: not a URL (a bracket that does not close, or a "
                          "character that stands for a delimiter)") from None
    try:
        parts.port  # noqa: B018 (raises for a bad port)
    except ValueError:  # as above: the port text quoted may be part of a password
        raise SourceError(f"{redact_url(url)}: the port is not a number from 0 to 65535") from None
    return parts


def url_identity(url: str) -> Hashable:
    """HttpSource.identity of the object at `url`, without contacting it: (origin, path, query),
    the same under an equivalent spelling (case of scheme and host, default port, userinfo)."""
    parts = split_url(url)
    return _origin(parts), parts.path or "/", parts.query


def url_origin(url: str) -> str:
    """scheme://host[:port] of `url`, lower-case, the default port left out (SourceError: see
    split_url)."""
    return _origin(split_url(url))


def _origin(parts: urllib.parse.SplitResult) -> str:
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    return f"{scheme}://{host}" if port in (None, DEFAULT_PORTS.get(scheme)) else f"{scheme}://{host}:{port}"


class _Transient(Exception):
    """One try failed in a way that a later try may not: retried until retry_time is spent."""

    def __init__(self, cause: str, retry_after: float | None = None, filled: int = 0, unanswered: bool = False):
        super().__init__(cause)
        self.retry_after = retry_after
        self.filled = filled  # bytes of the asked range already received before the failure
        self.unanswered = unanswered  # the request got no answer at all


@dataclasses.dataclass
class _Stats:
    bytes_fetched: int = 0
    requests: int = 0
    connections: int = 0
    retries: int = 0
    last_error: str | None = None


class _ConnectionPool:
    """Idle keep-alive connections of one lane, handed out one per request."""

    def __init__(self, connect: Callable[[], Connection], keep: int):
        self._connect, self._keep = connect, keep
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def get(self) -> tuple[Connection, bool]:
        """A connection, and whether it has served a request before (it may have timed out
        idle on the server's side since)."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._connect(), False

    def put(self, conn: Connection) -> None:
        """Keep `conn` for the next request if it may serve one (see Connection.reusable)."""
        with self._lock:
            if conn.reusable and not self._closed and len(self._idle) < self._keep:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class _BlockCache:
    """An LRU of whole blocks, bounded to `capacity` blocks. Not locked: the source's lock is.
    A block is bytes, or the read-only buffer it was received into alone: never a slice of a
    larger buffer, which one cached block would keep alive whole."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._blocks: OrderedDict[int, Block] = OrderedDict()

    def get(self, index: int) -> Block | None:
        data = self._blocks.get(index)
        if data is not None:
            self._blocks.move_to_end(index)
        return data

    def put(self, index: int, data: Block) -> None:
        if not self.capacity:
            return
        self._blocks[index] = data
        self._blocks.move_to_end(index)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)

    def __len__(self) -> int:
        return len(self._blocks)


class HttpSource:
    """The bytes of one object at an http:// or https:// URL (see the module docstring)."""

    remote = True

    def __init__(self, url: str, options: HttpOptions | None = None):
        self.options = opts = options or HttpOptions()
        self.name = redact_url(url)
        parts = split_url(url)
        self._scheme = parts.scheme.lower()
        if self._scheme not in DEFAULT_PORTS or not parts.hostname:
            raise SourceError(f"{self.name}: not an http:// or https:// URL with a host")
        self._port = parts.port or DEFAULT_PORTS[self._scheme]
        self.origin = url_origin(url)
        if opts.allowed_origins is not None and self.origin not in opts.allowed_origins:
            raise SourceError(f"{self.name}: {self.origin} is not an allowed origin (allowed: "
                              f"{', '.join(opts.allowed_origins) or 'none'})")
        self._host = parts.hostname
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._identity = url_identity(url)
        self._headers = {"Host": _host_header(self._host, self._port, self._scheme),
                         "User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if parts.username is not None:
            userinfo = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            self._headers["Authorization"] = "Basic " + base64.b64encode(userinfo.encode()).decode("ascii")
        self._request_head = self._build_request_head()
        self._tls = self._tls_context() if self._scheme == "https" else None

        self._lock = threading.Lock()
        self._stats = _Stats()
        self._cache = _BlockCache(opts.cache_size // opts.block_size)
        self._inflight: dict[int, concurrent.futures.Future[Block]] = {}
        self._sequential_end = -1  # where the last cached read ended
        self._readahead_end = 0  # how far readahead has been asked for
        self._ahead_queued = 0  # prefetch lane jobs not yet started
        self._staged: OrderedDict[tuple[int, int], concurrent.futures.Future[bytearray]] = OrderedDict()
        self._staged_bytes = 0
        self._guest = _ConnectionPool(self._connect, opts.connections)
        self._bulk = _ConnectionPool(self._connect, opts.connections)
        self._ahead = _ConnectionPool(self._connect, opts.connections)
        # (Threads a stream's gentle read may start: they must not keep its idle I/O class.)
        self._bulk_workers = concurrent.futures.ThreadPoolExecutor(opts.connections, "http-bulk",
                                                                   ioprio.inherit_started)
        self._ahead_workers = concurrent.futures.ThreadPoolExecutor(opts.connections, "http-ahead",
                                                                    ioprio.inherit_started)
        self.size = 0
        self.etag: str | None = None
        self.last_modified: str | None = None
        self.server: str | None = None
        try:
            self._probe()
        except BaseException:
            self.close()
            raise

    # -- the Source protocol ----------------------------------------------------------------------

    def identity(self) -> Hashable:
        """url_identity of the URL. Not for display: the query may hold a signature."""
        return self._identity

    @property
    def bulk_size(self) -> int:
        """connections x request_size: a read of this much keeps every bulk connection busy."""
        return self.options.connections * self.options.request_size

    def read_into(self, view: memoryview, offset: int, read_for: ReadFor = ReadFor.GUEST) -> int:
        length = max(0, min(len(view), self.size - offset))
        if length:
            view = view[:length]
            if self._is_bulk(length, read_for):
                self._read_bulk(view, offset)
            else:
                self._read_cached(view, offset)
        return length

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(max(0, min(length, self.size - offset)))
        self.read_into(memoryview(buf), offset)
        return bytes(buf)

    def prefetch(self, offset: int, length: int, read_for: ReadFor = ReadFor.GUEST) -> None:
        """Start fetching a range in the background: a small one into the block cache (prefetch
        lane), a bulk one (the stream's next step) into staged pieces (bulk lane) that the
        read of the same range takes over, so that the bulk connections stay busy while the
        caller installs what it read before."""
        length = min(length, self.size - offset)
        if length <= 0 or offset < 0:
            return
        if self._is_bulk(length, read_for):
            self._stage(offset, offset + length)
        else:
            self._fetch_ahead(offset, offset + length)

    def _is_bulk(self, length: int, read_for: ReadFor) -> bool:
        """Whether a read (or prefetch) of `length` bytes goes on the bulk lane: the stream's
        of any size (its data is read once: caching it would push the guest's out), and reads
        larger than any guest read (`info`, `check`), so that whatever request_size is, no
        guest read queues behind the bulk pieces."""
        return read_for is not ReadFor.GUEST or length >= max(self.options.request_size, GUEST_READ_MAX)

    def data_status(self, offset: int, length: int) -> tuple[bool, int]:
        return True, length

    def descriptor(self) -> int | None:
        return None

    def describe(self) -> dict[str, object]:
        with self._lock:
            stats = dataclasses.asdict(self._stats)
        return {"url": self.name, "size": self.size, "etag": self.etag, "last_modified": self.last_modified,
                "server": self.server, **stats}

    def close(self) -> None:
        """Stop the lanes and drop the connections, without waiting for transfers under way
        (each ends within `timeout`); a fetch still queued is never started."""
        for workers in (self._bulk_workers, self._ahead_workers):
            workers.shutdown(wait=False, cancel_futures=True)
        for pool in (self._guest, self._bulk, self._ahead):
            pool.close()

    @property
    def cached_blocks(self) -> int:
        with self._lock:
            return len(self._cache)

    # -- open --------------------------------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext:
        if not self.options.sslverify:
            log.warning("%s: sslverify=off: the server's certificate is not verified", self.name)
            return ssl._create_unverified_context()
        try:
            return ssl.create_default_context(cafile=self.options.ca_file)
        except (OSError, ssl.SSLError) as err:
            raise SourceError(f"{self.name}: cannot load ca_file {self.options.ca_file}: {err}") from None

    def _connect(self) -> Connection:
        with self._lock:
            self._stats.connections += 1
        return Connection(self._host, self._port, self.options.timeout, self._tls)

    def _build_request_head(self) -> bytes:
        """The GET's request line and headers but Range, as sent on every request."""
        lines = [f"GET {self._target} HTTP/1.1", *(f"{name}: {value}" for name, value in self._headers.items())]
        return "".join(f"{line}\r\n" for line in lines).encode("latin-1")

    def _probe(self) -> None:
        """Learn the size and pin the object's identity from a ranged GET of the first block
        (not HEAD: a presigned URL is signed for GET alone); the answer must prove that the
        server honours byte ranges. The block read is cached: formats read their header next."""
        first = self._with_retries(self._guest, self._probe_once)
        if first:
            self._cache.put(0, first)

    def _probe_once(self, conn: Connection) -> bytes:
        resp = self._send(conn, 0, self.options.block_size - 1)
        self.server = resp.header("Server")
        if resp.status == 416 and resp.header("Content-Range") == "bytes */0":
            self._pin(resp)
            return b""
        if resp.status == 200:
            raise SourceError(f"{self.name}: the server does not honour byte ranges "
                              "(it answered a Range request with the whole object)")
        if resp.status != 206:
            raise self._status_error(resp)
        start, stop, total = self._content_range(resp)
        if total is None or start != 0 or stop != min(self.options.block_size, total):
            raise SourceError(f"{self.name}: the server answered the range 0- with "
                              f"{resp.header('Content-Range')!r}: byte ranges unusable")
        self._check_body_length(conn, resp, stop)
        self._pin(resp)
        self.size = total
        buf = bytearray(stop)
        self._receive(conn, memoryview(buf))
        return bytes(buf)

    def _pin(self, resp: ResponseHead) -> None:
        etag, last_modified = resp.header("ETag"), resp.header("Last-Modified")
        self.etag = etag if etag and not etag.startswith("W/") else None  # If-Range takes strong ones only
        self.last_modified = last_modified
        if self.etag is None and last_modified is None:
            raise SourceError(f"{self.name}: the server gives neither a strong ETag nor Last-Modified, "
                              "so a change of the object could not be noticed")
        self._headers["If-Range"] = self.etag or last_modified
        self._request_head = self._build_request_head()

    # -- reads -------------------------------------------------------------------------------------

    def _read_bulk(self, view: memoryview, offset: int) -> None:
        """Fetch [offset, offset + len(view)) in pieces cut at multiples of request_size, over
        the bulk connections in parallel, straight into `view` (a piece staged by prefetch is
        copied from there). Returns only once no piece is writing into `view` any more."""
        fresh = []
        staged = []
        for start, stop in self._pieces(offset, offset + len(view)):
            target = view[start - offset : stop - offset]
            future = self._take_staged(start, stop)
            if future is None:
                fresh.append(self._bulk_workers.submit(self._fetch_exact, self._bulk, target, start))
            else:
                staged.append((future, target, start))
        try:
            for future, target, start in staged:
                try:
                    target[:] = future.result()
                except Exception:  # it failed back then: the server may be back now
                    self._fetch_exact(self._bulk, target, start)
        finally:
            _wait_all(fresh)

    def _pieces(self, offset: int, end: int) -> list[tuple[int, int]]:
        step = self.options.request_size
        cuts = [offset, *range((offset // step + 1) * step, end, step), end]
        return list(zip(cuts, cuts[1:], strict=False))

    def _stage(self, offset: int, end: int) -> None:
        """Fetch the pieces of [offset, end) into buffers of their own, keeping at most two
        bulk_size reads' worth of them (the step being read and the next one, which the copier
        prefetches before it reads the first): the oldest go first (a plan that changed leaves
        pieces nobody reads)."""
        limit = 2 * self.bulk_size
        for start, stop in self._pieces(offset, end):
            with self._lock:
                if (start, stop) in self._staged:
                    continue
                try:
                    self._staged[start, stop] = self._bulk_workers.submit(self._fetch_piece, start, stop)
                except RuntimeError:  # closed meanwhile
                    return
                self._staged_bytes += stop - start
                while self._staged_bytes > limit:
                    (old_start, old_stop), _ = self._staged.popitem(last=False)
                    self._staged_bytes -= old_stop - old_start

    def _take_staged(self, start: int, stop: int) -> concurrent.futures.Future[bytearray] | None:
        with self._lock:
            future = self._staged.pop((start, stop), None)
            if future is not None:
                self._staged_bytes -= stop - start
            return future

    def _fetch_piece(self, start: int, stop: int) -> bytearray:
        buf = bytearray(stop - start)
        self._fetch_exact(self._bulk, memoryview(buf), start)
        return buf

    def _read_cached(self, view: memoryview, offset: int) -> None:
        bs = self.options.block_size
        end = offset + len(view)
        blocks, missing = self._claim(offset // bs, (end - 1) // bs + 1)
        self._fetch_blocks(missing, self._guest, time.monotonic())
        for index, block in blocks.items():
            data = block.result() if isinstance(block, concurrent.futures.Future) else block
            lo, hi = max(offset, index * bs), min(end, index * bs + len(data))
            view[lo - offset : hi - offset] = data[lo - index * bs : hi - index * bs]
        self._maybe_read_ahead(offset, end)

    def _claim(self, first: int, stop: int) -> tuple[dict[int, Block | concurrent.futures.Future[Block]], list[int]]:
        """Each block of [first, stop): its data from the cache, the future of a fetch already
        on its way, or a new future that the caller must fulfil (the blocks listed as missing)."""
        blocks: dict[int, Block | concurrent.futures.Future[Block]] = {}
        missing = []
        with self._lock:
            for index in range(first, stop):
                cached = self._cache.get(index)
                if cached is not None:
                    blocks[index] = cached
                elif index in self._inflight:
                    blocks[index] = self._inflight[index]
                else:
                    blocks[index] = self._inflight[index] = concurrent.futures.Future()
                    missing.append(index)
        return blocks, missing

    def _fetch_blocks(self, missing: list[int], pool: _ConnectionPool, started: float) -> None:
        """Fetch claimed blocks, one request per run of consecutive ones, into the cache, and
        fulfil their futures; on failure every one of them gets the error. Every run's retries
        count from `started`: retry_time bounds the wait of the read as a whole."""
        bs = self.options.block_size
        runs: list[list[int]] = []
        for index in missing:
            if runs and runs[-1][-1] == index - 1:
                runs[-1].append(index)
            else:
                runs.append([index])
        try:
            for run in runs:
                start = run[0] * bs
                buf = memoryview(bytearray(min((run[-1] + 1) * bs, self.size) - start))
                self._fetch_exact(pool, buf, start, started)
                received = buf.toreadonly()
                with self._lock:
                    for index in run:
                        data = received if len(run) == 1 else bytes(received[(index - run[0]) * bs :
                                                                             (index - run[0] + 1) * bs])
                        self._cache.put(index, data)
                        self._inflight.pop(index).set_result(data)
        except BaseException as err:
            with self._lock:
                for index in missing:
                    future = self._inflight.pop(index, None)
                    if future is not None:
                        future.set_exception(err)
            raise

    def _maybe_read_ahead(self, offset: int, end: int) -> None:
        """A read that starts where the previous one ended is sequential: keep `readahead`
        bytes past it on their way. Another read starts the count again from where it ends, so
        that a sequential run below an earlier one is read ahead too."""
        with self._lock:
            sequential, self._sequential_end = offset == self._sequential_end, end
            if not sequential:
                self._readahead_end = end
                return
            start = max(end, self._readahead_end)
            stop = min(end + self.options.readahead, self.size)
            # Top it up in halves, not per read; near the end of the object, to its end.
            if stop <= start or (stop - start < self.options.readahead // 2 and stop < self.size):
                return
            if not self._take_ahead_slot():  # the lane is full: the next read asks again
                return
            self._readahead_end = stop
        self._submit_ahead(start, stop)

    def _fetch_ahead(self, start: int, stop: int) -> None:
        """Queue [start, stop) for the prefetch lane, unless it has enough queued already."""
        with self._lock:
            if not self._take_ahead_slot():
                return
        self._submit_ahead(start, stop)

    def _take_ahead_slot(self) -> bool:
        """Count one more job queued on the prefetch lane, if it has room (under the lock)."""
        if self._ahead_queued >= AHEAD_QUEUE_MAX * self.options.connections:
            return False
        self._ahead_queued += 1
        return True

    def _submit_ahead(self, start: int, stop: int) -> None:
        try:
            self._ahead_workers.submit(self._fetch_ahead_now, start, stop)
        except RuntimeError:  # closed meanwhile
            with self._lock:
                self._ahead_queued -= 1

    def _fetch_ahead_now(self, start: int, stop: int) -> None:
        """Claim the blocks only now, when a connection is free to fetch them: a guest read
        never waits for a fetch that is still queued, it fetches the block itself."""
        with self._lock:
            self._ahead_queued -= 1
        bs = self.options.block_size
        _, missing = self._claim(start // bs, (stop - 1) // bs + 1)
        try:
            self._fetch_blocks(missing, self._ahead, time.monotonic())
        except Exception as err:  # a hint: a reader waiting on these blocks gets the error
            log.debug("%s: readahead failed: %s", self.name, err)

    # -- one range, with retries -------------------------------------------------------------------

    def _fetch_exact(self, pool: _ConnectionPool, view: memoryview, offset: int, started: float | None = None) -> None:
        """Fill `view` with the object's bytes from `offset`, resuming after a failure where the
        data stopped; retrying until retry_time after `started` (by default, now)."""
        done = 0

        def attempt(conn: Connection) -> None:
            nonlocal done
            try:
                self._get_range(conn, view[done:], offset + done)
            except _Transient as err:
                done += err.filled
                raise

        self._with_retries(pool, attempt, started)

    def _with_retries(self, pool: _ConnectionPool, attempt: Callable[[Connection], _T],
                      started: float | None = None) -> _T:
        """attempt(conn) until it succeeds, a lasting failure, or retry_time since `started` (by
        default, now) is spent; the first attempt is always made. A connection that failed is
        closed, never reused."""
        opts = self.options
        started = time.monotonic() if started is None else started
        tries = 0
        while True:
            conn, reused = pool.get()
            tries += 1
            try:
                result = attempt(conn)
            except _Transient as err:
                conn.close()
                cause = str(err)
                self._note_error(cause)
                if reused and tries == 1 and err.unanswered:
                    continue  # a keep-alive connection the server had closed: no delay
                delay = self._backoff(tries, err.retry_after)
                elapsed = time.monotonic() - started
                if elapsed + delay > opts.retry_time:
                    raise SourceError(f"{self.name}: {cause} "
                                      f"(gave up after {tries} tries in {elapsed:.1f} s)") from None
                log.info("%s: %s; retrying in %.2f s", self.name, cause, delay)
                with self._lock:
                    self._stats.retries += 1
                time.sleep(delay)
            except SourceError as err:
                conn.close()
                self._note_error(str(err))
                raise
            except BaseException:
                conn.close()
                raise
            else:
                pool.put(conn)
                return result

    def _backoff(self, tries: int, retry_after: float | None) -> float:
        opts = self.options
        if retry_after is not None:
            return min(max(retry_after, opts.retry_delay_min), opts.retry_delay_max)
        ceiling = min(opts.retry_delay_max, opts.retry_delay_min * 2 ** (tries - 1))
        return random.uniform(ceiling / 2, ceiling)

    def _note_error(self, cause: str) -> None:
        with self._lock:
            self._stats.last_error = cause

    def _get_range(self, conn: Connection, view: memoryview, offset: int) -> None:
        """One GET of [offset, offset + len(view)) into `view`; raises _Transient for what a
        retry may cure, SourceError for what it cannot."""
        last = offset + len(view) - 1
        resp = self._send(conn, offset, last)
        if resp.status == 206:
            self._check_same_object(resp)
            start, stop, total = self._content_range(resp)
            if total != self.size:
                raise self._changed(f"its size is now {total}, not {self.size}")
            if (start, stop) != (offset, last + 1):
                raise SourceError(f"{self.name}: asked for bytes {offset}-{last}, the server answered "
                                  f"{resp.header('Content-Range')!r}")
            self._check_body_length(conn, resp, len(view))
            self._receive(conn, view)
            return
        if resp.status == 200:  # If-Range failed (the object changed), or Range was ignored
            self._check_same_object(resp)
            raise _Transient("the server answered with the whole object: it ignored the Range header, "
                             "or the object changed (If-Range did not match)")
        if resp.status == 416:
            raise self._changed(f"the range {offset}-{last} is past its end now")
        if resp.status == 412:
            raise self._changed("the server says the precondition failed")
        raise self._status_error(resp)

    def _send(self, conn: Connection, first: int, last: int) -> ResponseHead:
        """GET bytes first-last: the answer's status line and headers. What a retry may cure
        (connection errors, timeouts, 5xx, 429) is _Transient; a certificate that does not
        verify is not."""
        deadline = time.monotonic() + self.options.timeout + (last + 1 - first) / STALLED_RATE
        try:
            resp = conn.get_range(self._request_head, first, last, deadline)
        except ssl.SSLCertVerificationError as err:
            raise SourceError(f"{self.name}: {_describe_exception(err)}") from None
        except (OSError, WireError) as err:
            raise _Transient(_describe_exception(err), unanswered=True) from None
        with self._lock:
            self._stats.requests += 1
        if resp.status == 429 or 500 <= resp.status < 600:
            raise _Transient(f"HTTP {resp.status} {resp.reason}", retry_after=_retry_after(resp))
        encoding = resp.header("Content-Encoding", "identity")
        if resp.status in (200, 206) and encoding.lower() != "identity":
            raise SourceError(f"{self.name}: the server sent a {encoding}-encoded body, not the object's bytes")
        return resp

    def _receive(self, conn: Connection, view: memoryview) -> None:
        """The body into `view`, all of it; a body that ends early or stalls is _Transient with
        what arrived counted."""
        filled = 0
        try:
            while filled < len(view):
                n = conn.readinto(view[filled:])
                if not n:
                    break
                filled += n
        except OSError as err:
            self._count_fetched(filled)
            raise _Transient(_describe_exception(err), filled=filled) from None
        self._count_fetched(filled)
        if filled < len(view):
            raise _Transient(f"the body ended after {filled} of {len(view)} bytes", filled=filled)

    def _count_fetched(self, n: int) -> None:
        with self._lock:
            self._stats.bytes_fetched += n

    # -- answers that cannot be used ---------------------------------------------------------------

    def _content_range(self, resp: ResponseHead) -> tuple[int, int, int | None]:
        """(start, stop, total) of a 206 answer's Content-Range; total None for '*'."""
        header = resp.header("Content-Range") or ""
        match = _CONTENT_RANGE.fullmatch(header.strip())
        if match is None:
            raise SourceError(f"{self.name}: a 206 answer without a usable Content-Range ({header!r})")
        total = None if match[3] == "*" else int(match[3])
        return int(match[1]), int(match[2]) + 1, total

    def _check_body_length(self, conn: Connection, resp: ResponseHead, expected: int) -> None:
        if conn.body_length != expected:
            raise SourceError(f"{self.name}: a 206 answer of Content-Range {resp.header('Content-Range')!r} "
                              f"with a Content-Length of {conn.body_length}")

    def _check_same_object(self, resp: ResponseHead) -> None:
        etag, last_modified = resp.header("ETag"), resp.header("Last-Modified")
        if self.etag is not None and etag is not None and etag != self.etag:
            raise self._changed(f"ETag {self.etag} is now {etag}")
        if self.last_modified is not None and last_modified is not None and last_modified != self.last_modified:
            raise self._changed(f"Last-Modified {self.last_modified} is now {last_modified}")

    def _changed(self, how: str) -> SourceError:
        return SourceError(f"{self.name}: the object changed since it was opened ({how}); "
                           "none of its new data is used")

    def _status_error(self, resp: ResponseHead) -> SourceError:
        hint = ""
        if resp.status == 403 and REDACTED in self.name:
            hint = " (a presigned URL may have expired)"
        elif 300 <= resp.status < 400:
            hint = " (redirects are not followed: name the final URL)"
        return SourceError(f"{self.name}: HTTP {resp.status} {resp.reason}{hint}")


def _wait_all(futures: list[concurrent.futures.Future]) -> None:
    """Wait until none of `futures` runs any more (those not started are cancelled at the first
    error); then raise the first error."""
    concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
    for future in futures:
        future.cancel()
    concurrent.futures.wait(futures)
    for future in futures:
        if not future.cancelled() and future.exception() is not None:
            raise future.exception()


def _retry_after(resp: ResponseHead) -> float | None:
    """Retry-After in seconds (a number or an HTTP date), None when absent or unreadable."""
    value = resp.header("Retry-After")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _describe_exception(err: BaseException) -> str:
    if isinstance(err, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {err.verify_message}"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


def _host_header(host: str, port: int, scheme: str) -> str:
    """Host as a request names it: an IPv6 address in brackets, the port unless the default."""
    shown = f"[{host}]" if ":" in host else host
    return shown if port == DEFAULT_PORTS[scheme] else f"{shown}:{port}"
