"""HttpSource against real servers on loopback: nginx, a fault-injecting server of our own, and
moto's S3. Exact bytes, every fault either retried with exact data or a clear SourceError
within a bounded time, a changed object never mixed in, no credential anywhere it could show."""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import dataclasses
import logging
import random
import threading
import time

import pytest

from fusestream.errors import SourceError, UsageError
from fusestream.sources import ReadFor, http
from fusestream.sources.http import STALLED_RATE, HttpOptions, HttpSource, redact_url, url_origin
from fusestream.sources.http_wire import WireError, content_length, parse_head

KiB, MiB = 1 << 10, 1 << 20
REAL_GUEST_READ_MAX = http.GUEST_READ_MAX
# Fault tests: short timeouts and retry bounds, so that lasting failures end quickly.
QUICK = HttpOptions(timeout=0.5, retry_time=1.5, retry_delay_min=0.02, retry_delay_max=0.2)
SECRETS = ("s3cr3t", "sig-VALUE-123", "tok-456")


@pytest.fixture(autouse=True)
def small_bulk_reads(monkeypatch):
    """Reads of request_size (1 MiB in most tests here) go on the bulk lane, as the stream's
    8 MiB and more do with the defaults, so that the lane is tested on small objects; the test
    of which reads are bulk puts the real bound back."""
    monkeypatch.setattr(http, "GUEST_READ_MAX", 0)


def data_of(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def image(tmp_path):
    """A 9 MiB + 1234 byte file (not block-aligned) with random data, in its own directory."""
    root = tmp_path / "www"
    root.mkdir()
    path = root / "image.raw"
    path.write_bytes(data_of(9 * MiB + 1234))
    return path


def open_source(url: str, options: HttpOptions = QUICK) -> HttpSource:
    return HttpSource(url, options)


def read_exact(source: HttpSource, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    filled = source.read_into(memoryview(buf), offset)
    return bytes(buf[:filled])


# -- names ---------------------------------------------------------------------------------------


def test_redact_url_drops_userinfo_and_query_values():
    url = "https://user:s3cr3t@Example.org:8443/a/b.raw?X-Amz-Signature=sig-VALUE-123&token=tok-456&flag#frag"
    assert redact_url(url) == "https://Example.org:8443/a/b.raw?X-Amz-Signature=***&token=***&flag"
    assert url_origin(url) == "https://example.org:8443"
    assert url_origin("HTTP://Example.org:80/x") == "http://example.org"
    assert url_origin("http://[::1]:8080/x") == "http://[::1]:8080"
    # A password with an unencoded / ? or # splits as a host and port: all before the @ goes.
    assert redact_url("https://KEY:ab/cd@s3.example/b.qed") == "https://***@s3.example/b.qed"
    assert redact_url("https://KEY:12/cd@s3.example/b.qed?sig=x") == "https://***@s3.example/b.qed?sig=***"
    assert redact_url("https://KEY:ab?cd@h/x") == redact_url("https://KEY:ab#cd@h/x") == "https://***@h/x"
    assert redact_url("https://h/images/base@v2.raw") == "https://h/images/base@v2.raw"  # no port: no password


@pytest.mark.parametrize("url", ["https://KEY:ab/SECRET@h/x", "https://user:pa\uff0fSECRET@h/x", "https://[::1/SECRET"])
def test_a_url_that_cannot_be_used_is_refused_without_quoting_it(url):
    with pytest.raises(SourceError) as caught:
        open_source(url)
    assert "SECRET" not in str(caught.value) and str(caught.value).startswith("https://***")


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "http:///x", "http://127.0.0.1:99999/x", "http://h:port/x"])
def test_urls_it_cannot_use_are_refused(url):
    with pytest.raises(SourceError) as caught:
        open_source(url)
    assert str(caught.value).startswith(f"{url}: ")


def test_options_are_checked():
    with pytest.raises(UsageError, match="block_size"):
        HttpOptions(block_size=1000)
    with pytest.raises(UsageError, match="request_size"):
        HttpOptions(block_size=64 * KiB, request_size=100 * KiB)
    with pytest.raises(UsageError, match="contradict"):
        HttpOptions(sslverify=False, ca_file="/etc/ssl/certs/ca-certificates.crt")


# -- exact data from nginx -------------------------------------------------------------------------


def test_random_ranges_read_exactly_what_the_file_holds(nginx, image):
    server = nginx(image.parent)
    expected = image.read_bytes()
    source = open_source(server.url("image.raw"), HttpOptions(request_size=1 * MiB, block_size=16 * KiB))
    try:
        assert source.size == len(expected)
        rng = random.Random(1)
        for _ in range(300):
            length = rng.choice([1, 511, 4 * KiB, 16 * KiB + 3, 200 * KiB, 1 * MiB, 3 * MiB + 17])
            offset = rng.randrange(0, len(expected))
            read_for = rng.choice([ReadFor.GUEST] * 6 + [ReadFor.STREAM, ReadFor.GENTLE])
            buf = bytearray(length)
            filled = source.read_into(memoryview(buf), offset, read_for)
            assert filled == min(length, len(expected) - offset)
            assert buf[:filled] == expected[offset : offset + filled]
        assert source.read(len(expected) - 10, 100) == expected[-10:]  # short only at the end
        assert source.read(len(expected), 10) == b""
        assert source.data_status(0, 5 * MiB) == (True, 5 * MiB)
        info = source.describe()
        assert info["server"].startswith("nginx")
        assert info["etag"] and info["last_modified"]
        assert info["requests"] > 0 and info["bytes_fetched"] > 0 and info["retries"] == 0
    finally:
        source.close()


def test_identity_ignores_case_default_port_and_userinfo(fault_server):
    server = fault_server(data_of(100 * KiB))
    one = open_source(f"http://127.0.0.1:{server.port}/image.raw")
    other = open_source(f"HTTP://user:pw@127.0.0.1:{server.port}/image.raw")
    elsewhere = open_source(f"http://127.0.0.1:{server.port}/other.raw")
    try:
        assert one.identity() == other.identity() != elsewhere.identity()
    finally:
        for source in (one, other, elsewhere):
            source.close()


def test_threads_read_exact_data_at_once(nginx, image):
    server = nginx(image.parent)
    expected = image.read_bytes()
    source = open_source(server.url("image.raw"), HttpOptions(request_size=1 * MiB, cache_size=1 * MiB))
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(60):
                length = rng.choice([4 * KiB, 64 * KiB, 300 * KiB, 2 * MiB])
                offset = rng.randrange(0, len(expected) - length)
                assert read_exact(source, offset, length) == expected[offset : offset + length]
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors, errors
        assert not any(thread.is_alive() for thread in threads)
    finally:
        source.close()


def test_the_block_cache_stays_within_its_bound(fault_server):
    server = fault_server(data_of(4 * MiB))
    source = open_source(server.url(), HttpOptions(block_size=4 * KiB, cache_size=64 * KiB, readahead=0))
    try:
        for offset in range(0, 4 * MiB, 4 * KiB):
            read_exact(source, offset, 4 * KiB)
            assert source.cached_blocks <= 16
        assert source.cached_blocks == 16
        requests = len(server.requests)
        read_exact(source, 4 * MiB - 4 * KiB, 4 * KiB)  # the most recent block: from the cache
        assert len(server.requests) == requests
        read_exact(source, 0, 4 * KiB)  # long evicted: fetched again
        assert len(server.requests) == requests + 1
        # The bound is one of memory too: blocks fetched in one request are cached each on its
        # own, so that one left in the cache does not keep the others' memory alive.
        read_exact(source, 1 * MiB, 64 * KiB)
        blocks = [memoryview(block) for block in source._cache._blocks.values()]
        assert len(blocks) == 16 and all(block.nbytes == len(block.obj) == 4 * KiB for block in blocks)
    finally:
        source.close()


def wait_for_readahead(source: HttpSource) -> None:
    """Wait until every block readahead has asked for is in the cache: a busy machine may
    otherwise let the next read fetch the block itself before readahead's request is sent,
    which is right for a reader but makes a count of requests vary."""
    bs = source.options.block_size
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with source._lock:
            wanted = range(source._sequential_end // bs, -(-source._readahead_end // bs))
            if all(index in source._cache._blocks for index in wanted):
                return
        time.sleep(0.001)
    raise AssertionError("readahead did not finish in 10 s")


def test_sequential_small_reads_are_read_ahead(fault_server):
    data = data_of(8 * MiB)
    server = fault_server(data)
    source = open_source(server.url(), HttpOptions(block_size=64 * KiB, readahead=1 * MiB))
    try:
        for offset in range(0, 8 * MiB, 64 * KiB):
            assert read_exact(source, offset, 64 * KiB) == data[offset : offset + 64 * KiB]
            wait_for_readahead(source)
        # 128 reads. Readahead starts at the second read and tops its 1 MiB up in halves: the
        # open's probe (block 0), block 1, then 1 MiB, 512 KiB at a time up to the last half
        # MiB, and the rest. Without readahead, each read is a request of its own.
        ranges = [request.headers["Range"] for request in server.requests]
        pieces = [f"bytes={start}-{start + 512 * KiB - 1}" for start in range(1152 * KiB, 7808 * KiB, 512 * KiB)]
        assert ranges == ["bytes=0-65535", "bytes=65536-131071", "bytes=131072-1179647",
                          *pieces, f"bytes={7808 * KiB}-{8 * MiB - 1}"], ranges
    finally:
        source.close()


def test_a_sequential_run_below_an_earlier_one_is_read_ahead_too(fault_server):
    data = data_of(8 * MiB)
    server = fault_server(data)
    source = open_source(server.url(), HttpOptions(block_size=64 * KiB, readahead=1 * MiB))
    try:
        runs = []
        for start in (4 * MiB, 1 * MiB):
            before = len(server.requests)
            for offset in range(start, start + 2 * MiB, 64 * KiB):
                assert read_exact(source, offset, 64 * KiB) == data[offset : offset + 64 * KiB]
                wait_for_readahead(source)
            runs.append([tuple(int(n) - start for n in request.headers["Range"][6:].split("-"))
                         for request in server.requests[before:]])
        assert runs[1] == runs[0] and len(runs[0]) == 2 + 4, runs  # 2 blocks, 1 MiB, 3 x 512 KiB
    finally:
        source.close()


def test_readahead_that_finds_its_lane_full_asks_again_at_the_next_read(fault_server):
    data = data_of(4 * MiB)
    server = fault_server(data)
    source = open_source(server.url(), HttpOptions(block_size=64 * KiB, readahead=1 * MiB, connections=1))
    try:
        with source._lock:
            source._ahead_queued = http.AHEAD_QUEUE_MAX  # as if hints filled the lane
        read_exact(source, 0, 64 * KiB)
        read_exact(source, 64 * KiB, 64 * KiB)  # sequential, but no room: nothing asked
        with source._lock:
            source._ahead_queued = 0
        read_exact(source, 128 * KiB, 64 * KiB)
        wait_for_readahead(source)
        ranges = [request.headers["Range"] for request in server.requests]
        assert ranges == ["bytes=0-65535", "bytes=65536-131071", "bytes=131072-196607",
                          "bytes=196608-1245183"], ranges
    finally:
        source.close()


def test_prefetch_fills_the_cache_for_the_read_that_follows(fault_server):
    data = data_of(1 * MiB)
    server = fault_server(data)
    source = open_source(server.url(), HttpOptions(block_size=64 * KiB, readahead=0))
    try:
        source.prefetch(512 * KiB, 256 * KiB)
        deadline = time.monotonic() + 5
        while source.cached_blocks < 5 and time.monotonic() < deadline:  # block 0 from the open, and 4
            time.sleep(0.01)
        requests = len(server.requests)
        assert read_exact(source, 512 * KiB, 256 * KiB) == data[512 * KiB : 768 * KiB]
        assert len(server.requests) == requests
    finally:
        source.close()


def test_a_prefetched_bulk_range_is_read_from_its_staged_pieces(fault_server):
    data = data_of(8 * MiB)
    server = fault_server(data)
    source = open_source(server.url(), HttpOptions(connections=2, request_size=1 * MiB, readahead=0))
    try:
        source.prefetch(0, 1 * MiB)  # a plan that changed: never read, pushed out below
        # Pieces cut at 2, 3, 4 and 5 MiB, as the read cuts them: past the 4 MiB kept (two
        # bulk_size reads), so the oldest piece goes.
        source.prefetch(1 * MiB + 5, 4 * MiB)
        deadline = time.monotonic() + 5
        while len(server.requests) < 7 and time.monotonic() < deadline:  # the probe and 6 pieces
            time.sleep(0.01)
        requests = len(server.requests)
        assert read_exact(source, 1 * MiB + 5, 4 * MiB) == data[1 * MiB + 5 : 5 * MiB + 5]
        assert len(server.requests) == requests
        assert read_exact(source, 0, 1 * MiB) == data[: 1 * MiB]  # pushed out: fetched again
        assert len(server.requests) == requests + 1
    finally:
        source.close()


def test_a_staged_piece_that_failed_is_fetched_again(fault_server):
    data = data_of(4 * MiB)
    server = fault_server(data)
    source = open_source(server.url(), HttpOptions(timeout=0.5, retry_time=0.3, retry_delay_min=0.02,
                                                   retry_delay_max=0.1, request_size=1 * MiB))
    try:
        server.fault("status", count=None, status=503)
        source.prefetch(1 * MiB, 2 * MiB)
        with source._lock:
            pieces = list(source._staged.values())
        assert len(pieces) == 2
        concurrent.futures.wait(pieces, timeout=30)
        assert all(piece.exception() is not None for piece in pieces)  # both gave up
        server.clear()
        assert "HTTP 503" in source.describe()["last_error"]
        assert read_exact(source, 1 * MiB, 2 * MiB) == data[1 * MiB : 3 * MiB]
    finally:
        source.close()


@pytest.mark.parametrize("guest_read", [4 * KiB, 1 * MiB], ids=["4K", "1M"])
def test_a_guest_read_does_not_wait_behind_a_stream_transfer(nginx, image, monkeypatch, guest_read):
    """With every connection slowed to 512 KiB/s (after the first 512 KiB of each request, as
    nginx limits), a 6 MiB bulk read in 1 MiB pieces over 2 connections takes about 3 s; a guest
    read meanwhile goes on a connection of its own and takes 1 s at most, even one as large as
    request_size (the largest read FUSE sends, with http_request_size=1M), which queued behind
    the pieces would take 3 s or more."""
    monkeypatch.setattr(http, "GUEST_READ_MAX", REAL_GUEST_READ_MAX)
    server = nginx(image.parent, limit_rate=512 * KiB)
    source = open_source(server.url("image.raw"),
                         HttpOptions(connections=2, request_size=1 * MiB, block_size=16 * KiB, readahead=0))
    try:
        bulk = threading.Thread(target=read_exact, args=(source, 2 * MiB, 6 * MiB))
        started = time.monotonic()
        bulk.start()
        time.sleep(0.2)
        guest_start = time.monotonic()
        assert read_exact(source, 8 * MiB, guest_read) == image.read_bytes()[8 * MiB : 8 * MiB + guest_read]
        guest_time = time.monotonic() - guest_start
        bulk.join(timeout=30)
        bulk_time = time.monotonic() - started
        assert bulk_time > 2.5 and guest_time < 0.8 * bulk_time, (guest_time, bulk_time)  # queued: ~bulk_time
    finally:
        source.close()


# -- faults ----------------------------------------------------------------------------------------


FAULT_CASES = [
    {"kind": "drop"},
    {"kind": "stall", "stall": 1.0},  # longer than the timeout
    {"kind": "status", "status": 500},
    {"kind": "status", "status": 503},
    {"kind": "status", "status": 429, "retry_after": "1"},
    {"kind": "ignore_range"},
    {"kind": "truncate"},
]


def fault_id(fault: dict) -> str:
    return f"{fault['kind']}-{fault.get('status', '')}"


@pytest.mark.parametrize("fault", FAULT_CASES, ids=fault_id)
@pytest.mark.parametrize("bulk", [False, True], ids=["cached", "bulk"])
def test_a_passing_fault_is_retried_and_the_data_exact(fault_server, fault, bulk):
    data = data_of(3 * MiB)
    server = fault_server(data)
    source = open_source(server.url(), HttpOptions(timeout=0.5, retry_time=5, retry_delay_min=0.02,
                                                   retry_delay_max=0.2, request_size=1 * MiB, readahead=0))
    try:
        params = dict(fault)
        server.fault(params.pop("kind"), count=2, **params)
        offset, length = (300 * KiB, 2 * MiB) if bulk else (2 * MiB + 5, 100 * KiB)
        assert read_exact(source, offset, length) == data[offset : offset + length]
        info = source.describe()
        assert info["retries"] >= 1 and info["last_error"]
    finally:
        source.close()


@pytest.mark.parametrize("fault", FAULT_CASES, ids=fault_id)
def test_a_lasting_fault_is_a_source_error_in_bounded_time(fault_server, fault):
    server = fault_server(data_of(1 * MiB))
    source = open_source(server.url(query="X-Amz-Signature=sig-VALUE-123"))
    try:
        params = dict(fault)
        server.fault(params.pop("kind"), count=None, **params)
        started = time.monotonic()
        with pytest.raises(SourceError) as caught:
            read_exact(source, 512 * KiB, 4 * KiB)
        elapsed = time.monotonic() - started
        assert elapsed < QUICK.retry_time + 2 * QUICK.timeout + 1.5, elapsed
        message = str(caught.value)
        assert message.startswith(f"http://127.0.0.1:{server.port}/image.raw?X-Amz-Signature=***: ")
        assert "gave up after" in message
        assert "sig-VALUE-123" not in message
    finally:
        source.close()


def test_retry_after_is_honoured_and_bounded(fault_server, monkeypatch):
    data = data_of(1 * MiB)
    server = fault_server(data)
    options = HttpOptions(timeout=1, retry_time=10, retry_delay_min=0.01, retry_delay_max=0.6)
    source = open_source(server.url(), options)
    delays = []

    def backoff(tries, retry_after):
        delays.append(HttpSource._backoff(source, tries, retry_after))
        return delays[-1]

    monkeypatch.setattr(source, "_backoff", backoff)
    try:
        server.fault("status", count=1, status=429, retry_after="0.4")  # not a number: exponential backoff
        read_exact(source, 100 * KiB, 1 * KiB)
        server.fault("status", count=1, status=503, retry_after="1")
        started = time.monotonic()
        read_exact(source, 200 * KiB, 1 * KiB)
        assert time.monotonic() - started > 0.55  # the delay is slept, not only computed
        server.fault("status", count=1, status=429, retry_after="3600")
        assert read_exact(source, 300 * KiB, 1 * KiB) == data[300 * KiB : 301 * KiB]
        # 1 s and an hour asked for, both capped at retry_delay_max
        assert delays[0] <= 0.01 and delays[1:] == [0.6, 0.6], delays
    finally:
        source.close()


def test_a_changed_object_is_never_mixed_in(fault_server):
    data = data_of(2 * MiB)
    server = fault_server(data)
    source = open_source(server.url(), HttpOptions(request_size=1 * MiB, readahead=0))
    try:
        assert read_exact(source, 0, 100 * KiB) == data[: 100 * KiB]
        server.change(data_of(2 * MiB, seed=9))  # If-Range honoured: the server answers 200, whole
        for offset, length in ((1 * MiB, 4 * KiB), (0, 2 * MiB)):
            with pytest.raises(SourceError, match=r"image\.raw: the object changed since it was opened \(ETag"):
                read_exact(source, offset, length)
        assert read_exact(source, 0, 64 * KiB) == data[: 64 * KiB]  # still cached from before the change
    finally:
        source.close()


def test_a_changed_object_behind_a_server_ignoring_if_range(fault_server):
    data = data_of(2 * MiB)
    server = fault_server(data)
    source = open_source(server.url(), HttpOptions(readahead=0))
    try:
        server.change(data_of(2 * MiB, seed=9), honour_if_range=False)  # 206 of the new object
        with pytest.raises(SourceError, match="object changed"):
            read_exact(source, 1 * MiB, 4 * KiB)
        server.change(data_of(1 * MiB, seed=9), honour_if_range=False)  # shorter now
        with pytest.raises(SourceError, match="object changed"):
            read_exact(source, 1 * MiB, 4 * KiB)
    finally:
        source.close()


def test_if_range_carries_the_pinned_etag(fault_server):
    server = fault_server(data_of(1 * MiB))
    source = open_source(server.url(), HttpOptions(readahead=0))
    try:
        read_exact(source, 500 * KiB, 1 * KiB)
        assert "If-Range" not in server.requests[0].headers  # the probe pins it
        assert server.requests[-1].headers["If-Range"] == server.etag
    finally:
        source.close()


def test_a_server_that_ignores_range_is_refused_at_open(fault_server):
    server = fault_server(data_of(1 * MiB))
    server.fault("ignore_range", count=None)
    with pytest.raises(SourceError, match="does not honour byte ranges"):
        open_source(server.url())


def test_a_server_without_validators_is_refused_at_open(fault_server):
    server = fault_server(data_of(1 * MiB), validators=False)
    with pytest.raises(SourceError, match="neither a strong ETag nor Last-Modified"):
        open_source(server.url())


def test_an_unknown_object_is_refused_at_once(nginx, image):
    server = nginx(image.parent)
    started = time.monotonic()
    with pytest.raises(SourceError, match=r"missing\.raw: HTTP 404 Not Found"):
        open_source(server.url("missing.raw"), HttpOptions(retry_time=30))
    assert time.monotonic() - started < 5  # retried, it would take 30 s


def test_the_source_works_again_when_the_server_is_back(fault_server):
    data = data_of(2 * MiB)
    server = fault_server(data)
    source = open_source(server.url(), HttpOptions(timeout=0.5, retry_time=1, retry_delay_min=0.02,
                                                   retry_delay_max=0.1, request_size=1 * MiB, readahead=0))
    try:
        assert read_exact(source, 0, 4 * KiB) == data[: 4 * KiB]
        server.stop()
        for offset, length in ((1 * MiB, 4 * KiB), (0, 2 * MiB)):
            with pytest.raises(SourceError, match="gave up after"):
                read_exact(source, offset, length)
        server.start()
        assert read_exact(source, 1 * MiB, 4 * KiB) == data[1 * MiB : 1 * MiB + 4 * KiB]
        assert read_exact(source, 0, 2 * MiB) == data
        assert source.describe()["last_error"]
    finally:
        source.close()


def test_the_server_can_come_back_during_the_retries(fault_server):
    data = data_of(1 * MiB)
    server = fault_server(data)
    source = open_source(server.url(), HttpOptions(timeout=0.5, retry_time=10, retry_delay_min=0.05,
                                                   retry_delay_max=0.2, readahead=0))
    try:
        server.stop()
        threading.Timer(0.5, server.start).start()
        assert read_exact(source, 512 * KiB, 4 * KiB) == data[512 * KiB : 516 * KiB]
        assert source.describe()["retries"] >= 1
    finally:
        source.close()


# -- credentials -----------------------------------------------------------------------------------


def test_credentials_never_show(fault_server, caplog):
    caplog.set_level(logging.DEBUG)
    server = fault_server(data_of(1 * MiB))
    url = server.url(userinfo="alice:s3cr3t@", query="X-Amz-Signature=sig-VALUE-123&token=tok-456")
    source = open_source(url)
    try:
        assert source.name == f"http://127.0.0.1:{server.port}/image.raw?X-Amz-Signature=***&token=***"
        expected_auth = "Basic " + base64.b64encode(b"alice:s3cr3t").decode()
        assert server.requests[0].headers["Authorization"] == expected_auth
        assert server.requests[0].target.endswith("X-Amz-Signature=sig-VALUE-123&token=tok-456")
        server.fault("status", count=2, status=503)
        read_exact(source, 100 * KiB, 1 * KiB)
        server.fault("drop", count=None)
        with pytest.raises(SourceError) as caught:
            read_exact(source, 200 * KiB, 1 * KiB)
        shown = [source.name, str(source.describe()), str(caught.value), caplog.text]
        assert "retrying" in caplog.text
        for secret in SECRETS + ("alice",):
            for text in shown:
                assert secret not in text
    finally:
        source.close()


def test_origins_not_allowed_are_never_contacted(fault_server):
    server = fault_server(data_of(1 * MiB))
    with pytest.raises(SourceError, match=r"http://127\.0\.0\.1:\d+ is not an allowed origin"):
        open_source(server.url(), HttpOptions(allowed_origins=("https://images.example",)))
    assert server.requests == []
    open_source(server.url(), HttpOptions(allowed_origins=(f"http://127.0.0.1:{server.port}",))).close()


# -- HTTPS -----------------------------------------------------------------------------------------


def test_https_with_a_private_ca(nginx, image, tls_files, caplog):
    server = nginx(image.parent, tls=tls_files)
    url = server.url("image.raw")
    expected = image.read_bytes()
    source = open_source(url, HttpOptions(ca_file=str(tls_files.ca)))
    try:
        assert read_exact(source, 5 * MiB, 5 * MiB) == expected[5 * MiB : 10 * MiB]
    finally:
        source.close()
    started = time.monotonic()
    with pytest.raises(SourceError, match="certificate verification failed"):
        open_source(url, HttpOptions(retry_time=30))  # the system store does not know the CA: not retried
    assert time.monotonic() - started < 5  # retried, it would take 30 s
    caplog.set_level(logging.WARNING)
    source = open_source(url, HttpOptions(sslverify=False))
    try:
        assert "sslverify=off" in caplog.text
        assert read_exact(source, 0, 4 * KiB) == expected[: 4 * KiB]
    finally:
        source.close()


def test_a_missing_ca_file_is_named(nginx, image, tmp_path):
    server = nginx(image.parent)
    with pytest.raises(SourceError, match="cannot load ca_file"):
        open_source(server.url("image.raw").replace("http:", "https:"),
                    HttpOptions(ca_file=str(tmp_path / "none.pem")))


# -- S3 --------------------------------------------------------------------------------------------


def test_a_presigned_s3_url_reads_like_any_url(s3_server):
    data = data_of(3 * MiB + 5)
    s3_server.put("images", "base.raw", data)
    url = s3_server.presigned("images", "base.raw")
    source = open_source(url, HttpOptions(request_size=1 * MiB))
    try:
        assert source.size == len(data)
        assert read_exact(source, 0, len(data)) == data
        assert read_exact(source, 2 * MiB + 1, 10 * KiB) == data[2 * MiB + 1 : 2 * MiB + 1 + 10 * KiB]
        signature = url.rpartition("X-Amz-Signature=")[2]
        assert signature not in source.name + str(source.describe())
        assert "X-Amz-Signature=***" in source.name
    finally:
        source.close()


def test_an_expired_presigned_url_is_a_clear_error(s3_server):
    data = data_of(1 * MiB)
    s3_server.put("images", "soon.raw", data)
    signed = time.time()
    url = s3_server.presigned("images", "soon.raw", expires=3)  # X-Amz-Date is cut to the second:
    signature = url.rpartition("X-Amz-Signature=")[2]           # 2 to 3 s left for the open
    source = open_source(url, HttpOptions(readahead=0))
    try:
        assert read_exact(source, 0, 4 * KiB) == data[: 4 * KiB]
        time.sleep(max(0.0, signed + 3 + 1.1 - time.time()))
        with pytest.raises(SourceError) as caught:
            read_exact(source, 512 * KiB, 4 * KiB)
        message = str(caught.value)
        assert "soon.raw" in message and "HTTP 403" in message and "presigned URL may have expired" in message
        assert signature not in message
    finally:
        source.close()
    with pytest.raises(SourceError, match="presigned URL may have expired"):
        open_source(url)


# -- the wire: answers read by http_wire -----------------------------------------------------------

OBJECT = data_of(200 * KiB, seed=7)
VALIDATORS = b'ETag: "v1"\r\nLast-Modified: Tue, 14 Nov 2023 22:13:20 GMT\r\n'


def partial(first: int, last: int, extra: bytes = b"", length: int | None = None,
            content_range: bytes | None = None) -> bytes:
    """A 206 of OBJECT's bytes first-last as a web server writes it, with changes."""
    body = OBJECT[first : last + 1]
    content_range = content_range or b"bytes %d-%d/%d" % (first, last, len(OBJECT))
    return (b"HTTP/1.1 206 Partial Content\r\nServer: raw\r\n" + VALIDATORS
            + b"Content-Range: %s\r\nContent-Length: %d\r\n%s\r\n" % (content_range, len(body) if length is None
                                                                       else length, extra) + body)


def test_parse_head_reads_status_headers_and_keep_alive():
    head = parse_head(b"HTTP/1.1 206 Partial Content\r\nETag: \"x\"\r\nVia: a\r\nvia:  b \r\nContent-Length: 5")
    assert (head.status, head.reason, head.keep_alive) == (206, "Partial Content", True)
    assert head.header("etag") == '"x"' and head.header("Via") == "a, b" and head.header("X") is None
    assert content_length(head) == 5
    assert not parse_head(b"HTTP/1.1 200 OK\r\nConnection: close").keep_alive
    assert not parse_head(b"HTTP/1.0 200 OK").keep_alive
    assert parse_head(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive").keep_alive
    assert parse_head(b"HTTP/1.1 204").reason == ""


@pytest.mark.parametrize("head", [b"HTTP/2 206 Partial", b"ICY 200 OK", b"HTTP/1.1 20 OK", b"",
                                  b"HTTP/1.1 206 OK\r\nno colon", b"HTTP/1.1 206 OK\r\n folded: x",
                                  b"HTTP/1.1 206 OK\r\nbad name: x", b"HTTP/1.1 206 OK\r\n: x"])
def test_parse_head_refuses_malformed_answers(head):
    with pytest.raises(WireError):
        parse_head(head)


@pytest.mark.parametrize("fields", [b"", b"Content-Length: 12a", b"Content-Length: -1",
                                    b"Transfer-Encoding: chunked\r\nContent-Length: 5"])
def test_a_body_not_framed_by_content_length_is_refused(fields):
    with pytest.raises(WireError):
        content_length(parse_head(b"HTTP/1.1 206 Partial Content\r\n" + fields))


@pytest.mark.parametrize("piece", [1, 7, 1 << 16])
def test_answers_in_any_pieces_read_exactly_on_one_connection(raw_server, piece):
    server = raw_server(partial, piece=piece)
    source = open_source(server.url(), HttpOptions(block_size=4 * KiB, readahead=0))
    try:
        for offset in (0, 5 * KiB, 199 * KiB, 100 * KiB + 3):
            assert read_exact(source, offset, 4 * KiB) == OBJECT[offset : offset + 4 * KiB]
        assert source.server == "raw" and source.etag == '"v1"'
        assert server.connections == 1  # kept alive
    finally:
        source.close()


def test_a_connection_the_server_closes_is_not_reused(raw_server):
    server = raw_server(lambda first, last: partial(first, last, b"Connection: close\r\n"))
    source = open_source(server.url(), HttpOptions(block_size=4 * KiB, readahead=0))
    try:
        for offset in (8 * KiB, 64 * KiB):
            assert read_exact(source, offset, 100) == OBJECT[offset : offset + 100]
        assert server.connections == 3 and source.describe()["retries"] == 0
    finally:
        source.close()


def test_a_keep_alive_connection_closed_after_its_answer_is_retried_at_once(raw_server):
    server = raw_server(partial, per_connection=1)
    source = open_source(server.url(), HttpOptions(block_size=4 * KiB, readahead=0))
    try:
        assert read_exact(source, 64 * KiB, 100) == OBJECT[64 * KiB : 64 * KiB + 100]
        assert server.connections == 2 and source.describe()["retries"] == 0
    finally:
        source.close()


@pytest.mark.parametrize(("answer", "message"), [
    (lambda first, last: partial(first, last, length=last - first), "Content-Length of"),
    (lambda first, last: partial(first, last, content_range=b"bytes %d-%d/%d" % (first + 1, last + 1, len(OBJECT))),
     "the server answered"),
    (lambda first, last: partial(first, last, b"Content-Range: bytes 0-1/2\r\n"), "usable Content-Range"),
])
def test_a_mismatched_answer_is_refused_at_once(raw_server, answer, message):
    good = [True]  # the probe is answered well, then every answer is mismatched

    def answers(first: int, last: int) -> bytes:
        reply = partial(first, last) if good[0] else answer(first, last)
        good[0] = False
        return reply

    source = open_source(raw_server(answers).url(), HttpOptions(block_size=4 * KiB, readahead=0, retry_time=30))
    try:
        started = time.monotonic()
        with pytest.raises(SourceError, match=message):
            read_exact(source, 64 * KiB, 100)
        assert time.monotonic() - started < 5  # not retried: that would take 30 s
    finally:
        source.close()


def test_a_first_block_shorter_than_asked_is_refused_at_open(raw_server):
    """A 206 may answer less than the Range asked: a first block cut short would read as zeros
    where its rest is, so the open refuses it, as a read refuses any answer not exactly asked."""
    server = raw_server(lambda first, last: partial(first, min(last, first + 999)))
    with pytest.raises(SourceError, match="answered the range 0- with 'bytes 0-999/204800'"):
        open_source(server.url(), HttpOptions(block_size=4 * KiB))


def test_interim_answers_are_skipped(raw_server):
    early_hints = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    server = raw_server(lambda first, last: early_hints + b"HTTP/1.1 100 Continue\r\n\r\n" + partial(first, last),
                        piece=7)
    source = open_source(server.url(), HttpOptions(block_size=4 * KiB, readahead=0))
    try:
        for offset in (0, 5 * KiB, 199 * KiB):
            assert read_exact(source, offset, 4 * KiB) == OBJECT[offset : offset + 4 * KiB]
        assert server.connections == 1 and source.describe()["retries"] == 0
    finally:
        source.close()


def test_a_trickling_server_fails_a_read_in_bounded_time(raw_server):
    """A byte every 50 ms never lets a wait for bytes time out; the answer's deadline (timeout,
    then STALLED_RATE) ends each try, and retry_time the read, as for a server that sends
    nothing."""
    answered = [0]

    def answers(first: int, last: int):
        answered[0] += 1
        reply = partial(first, last)
        if answered[0] == 1:  # the probe: at once
            yield reply
            return
        for at in range(len(reply)):
            yield reply[at : at + 1]
            time.sleep(0.05)

    source = open_source(raw_server(answers).url(), dataclasses.replace(QUICK, block_size=4 * KiB, readahead=0))
    try:
        started = time.monotonic()
        with pytest.raises(SourceError, match="timed out .*gave up after"):
            read_exact(source, 64 * KiB, 100)
        elapsed = time.monotonic() - started
        attempt = QUICK.timeout + 4 * KiB / STALLED_RATE
        assert elapsed < QUICK.retry_time + 2 * attempt + 1.0, elapsed
    finally:
        source.close()


def test_retry_time_bounds_a_read_of_several_missing_runs_as_a_whole(raw_server):
    """A read whose missing blocks make three runs (cached blocks between them), each run
    answered 503 eight times before it is served: each run alone would get through within
    retry_time, the three together do not, and the read fails within one retry_time."""
    armed, failures = [False], collections.Counter()

    def answers(first: int, last: int) -> bytes:
        if armed[0] and failures[first] < 8:
            failures[first] += 1
            return b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
        return partial(first, last)

    options = HttpOptions(block_size=4 * KiB, readahead=0, timeout=0.5, retry_time=2.5, retry_delay_min=0.2,
                          retry_delay_max=0.2)
    source = open_source(raw_server(answers).url(), options)
    try:
        for block in (1, 3, 5):  # block 0 is cached by the open
            read_exact(source, block * 4 * KiB, 4 * KiB)
        armed[0] = True
        started = time.monotonic()
        with pytest.raises(SourceError, match="HTTP 503 .*gave up after"):
            read_exact(source, 0, 7 * 4 * KiB)  # blocks 2, 4 and 6 missing
        elapsed = time.monotonic() - started
        assert elapsed < options.retry_time + options.retry_delay_max + 0.5, elapsed
        assert failures[2 * 4 * KiB] == 8  # the first run did get through
    finally:
        source.close()


@pytest.mark.parametrize("reply", [b"HTTP/1.1 206 Partial\r\nbroken header\r\n\r\n", b"garbage\r\n\r\n",
                                   b"HTTP/1.1 206 Partial\r\nContent-Le", b"HTTP/1.1 206 OK\r\n" + b"X: y\r\n" * 9000])
def test_a_malformed_answer_is_retried_then_a_source_error(raw_server, reply):
    first_answer = [True]

    def answers(first: int, last: int) -> bytes:
        good, first_answer[0] = first_answer[0], False
        return partial(first, last) if good else reply

    source = open_source(raw_server(answers, per_connection=1).url(), QUICK)
    try:
        with pytest.raises(SourceError, match="gave up after"):
            read_exact(source, 64 * KiB, 100)
        assert source.describe()["retries"] > 0
    finally:
        source.close()
