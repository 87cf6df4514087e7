"""Remote backing layers end to end: chains whose layers live on nginx, on the fault-injecting
server (alone, or as a proxy injecting its faults in front of nginx) or in moto's S3, opened,
mounted and streamed. QEMU is the oracle: what the raw file
reads is what `qemu-img convert` gives of the same chain with the base local (the top copied
and rebased with `qemu-img rebase -u`, the procedure docs/mount.fusestream.md gives for a new
URL). Every stream either completes with exact data and a clean image, or fails naming the URL
and the cause; no credential shows in status, events or logs."""

from __future__ import annotations

import errno
import functools
import json
import mmap
import os
import random
import re
import shutil
import time
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import (
    FUSESTREAM,
    MOUNT_HELPER,
    ctl,
    qemu_check,
    qemu_convert,
    qemu_img,
    qemu_io,
    run,
    run_with_streamer,
    stream_to_end,
)

from fusestream import stream
from fusestream.chain import Confinement
from fusestream.errors import BackingFileError, CommandError, UsageError
from fusestream.faults import WriteErrors
from fusestream.mount import http_options, parse_options
from fusestream.sources import HttpOptions, resolve_backing
from fusestream.stream import GUEST_BUSY_SECONDS, CopyOnRead, GuestActivity, Streamer

KiB, MiB = 1 << 10, 1 << 20
BASE_SIZE = 4 * MiB
# Mount options for the fault tests: short timeouts and backoff, so that retries take
# milliseconds and a lasting failure ends within about a second.
# Retries that give up soon, yet outlast TRANSIENT_FAULTS: two stalls met by one request cost two
# timeouts (1 s) before its third try.
QUICK = ("http_timeout=0.5", "http_retry_time=2.5", "http_retry_delay_min=0.01", "http_retry_delay_max=0.05")
SECRET = "s3cr3t"
WAIT_SECONDS = 30


def base_data(seed: int = 0) -> bytes:
    """Random data with a zero MiB in the middle, which must stay unallocated when streamed."""
    rng = random.Random(seed)
    return rng.randbytes(BASE_SIZE // 2) + bytes(MiB) + rng.randbytes(BASE_SIZE // 2 - MiB)


def create_top(top: Path, backing: str, fmt: str = "raw") -> None:
    run(FUSESTREAM, "create", "-b", backing, "-F", fmt, str(top))


def local_oracle(top: Path, local_base: Path, tmp: Path, fmt: str = "raw") -> bytes:
    """qemu-img convert of the chain as it is now, with the base local."""
    copy = tmp / "oracle.qed"
    shutil.copyfile(top, copy)
    qemu_img("rebase", "-u", "-f", "qed", "-b", str(local_base), "-F", fmt, str(copy))
    return qemu_convert(copy, tmp / "oracle.raw")


def top_alone(top: Path, tmp: Path) -> Path:
    """A copy of the top image without its backing file, for qemu-img to check and read alone
    (the fault server answers no HEAD, which QEMU's curl driver sends at open)."""
    copy = tmp / "alone.qed"
    shutil.copyfile(top, copy)
    qemu_img("rebase", "-u", "-f", "qed", "-b", "", str(copy))
    return copy


def status_json(m) -> dict:
    return json.loads((m.mountpoint / "status.json").read_text())["images"][0]


def events(m) -> list[dict]:
    return [json.loads(line) for line in (m.mountpoint / "events").read_text().splitlines()]


def wait_stream_end(m) -> dict:
    deadline = time.monotonic() + WAIT_SECONDS
    while (image := status_json(m))["stream"]["state"] in ("running", "paused"):
        assert time.monotonic() < deadline, image
        time.sleep(0.02)
    return image


def read_raw(m) -> bytes:
    return m.raw.read_bytes()


def guest_write_and_fsync(m, writes: list[tuple[int, bytes]]) -> None:
    fd = os.open(m.raw, os.O_WRONLY)
    try:
        for offset, data in writes:
            os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def apply(data: bytes, writes: list[tuple[int, bytes]]) -> bytes:
    out = bytearray(data)
    for offset, chunk in writes:
        out[offset : offset + len(chunk)] = chunk
    return bytes(out)


GUEST_WRITES = [(100, b"w" * 5000), (BASE_SIZE - 70 * KiB, b"x" * 3), (2 * MiB + 4096, b"y" * 65536)]


# -- the chain: names, confinement, formats (no mount) --------------------------------------------


def test_backing_names_resolve_as_qemu_resolves_them():
    assert resolve_backing("http://h/d/top.qed", "base.raw") == "http://h/d/base.raw"
    assert resolve_backing("http://h/d/top.qed?sig=1", "../b/base.raw") == "http://h/b/base.raw"
    assert resolve_backing("/vm/top.qed", "https://h/base.raw") == "https://h/base.raw"
    assert resolve_backing("http://h/d/top.qed", "https://other/base.raw") == "https://other/base.raw"
    assert resolve_backing("http://h/d/top.qed", "/vm/base.raw") == "/vm/base.raw"  # as QEMU: a path


def test_with_backing_dir_a_remote_layer_needs_allowed_origins_and_nothing_is_contacted(
        tmp_path, fault_server, open_chains):
    server = fault_server(base_data())
    create_top(tmp_path / "top.qed", server.url())
    server.requests.clear()
    with pytest.raises(BackingFileError, match="is remote, and with backing_dir only the origins"):
        open_chains(tmp_path / "top.qed", confinement=Confinement(backing_dir=str(tmp_path)))
    other = HttpOptions(allowed_origins=("http://127.0.0.1:1",))
    with pytest.raises(BackingFileError, match=rf"127\.0\.0\.1:{server.port} is not an allowed origin"):
        open_chains(tmp_path / "top.qed", confinement=Confinement(backing_dir=str(tmp_path), http=other))
    assert server.requests == []
    allowed = HttpOptions(allowed_origins=(f"http://127.0.0.1:{server.port}",))
    c = open_chains(tmp_path / "top.qed", confinement=Confinement(backing_dir=str(tmp_path), http=allowed))
    assert c.remote and c.read(0, 4096) == base_data()[:4096]


def test_a_remote_image_naming_itself_is_a_loop(tmp_path, nginx, open_chains):
    www = tmp_path / "www"
    www.mkdir()
    server = nginx(www)
    # A QED image on the server whose backing name is its own URL, spelt another way.
    qemu_img("create", "-f", "qed", "-u", "-b", f"HTTP://127.0.0.1:{server.port}/self.qed", "-F", "qed",
             str(www / "self.qed"), "1M")
    create_top(tmp_path / "top.qed", server.url("self.qed"), "qed")
    with pytest.raises(BackingFileError, match="backing file loop: .*self.qed is already in the chain"):
        open_chains(tmp_path / "top.qed")


def test_errors_name_the_image_and_the_url_never_its_credentials(tmp_path, fault_server, open_chains):
    server = fault_server(base_data())
    url = server.url(userinfo=f"user:{SECRET}@", query=f"X-Amz-Signature={SECRET}")
    create_top(tmp_path / "top.qed", url)
    server.fault("status", count=None, status=500)
    quick = HttpOptions(timeout=0.5, retry_time=0.3, retry_delay_min=0.01, retry_delay_max=0.05)
    with pytest.raises(BackingFileError) as err:
        open_chains(tmp_path / "top.qed", confinement=Confinement(http=quick))
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'top.qed'}: backing file http://127.0.0.1:{server.port}/image.raw")
    assert "HTTP 500" in message and SECRET not in message
    assert any(r.headers.get("Authorization") for r in server.requests)  # the credentials were used


BAD_URLS = [  # (a URL that names nothing, as messages show it, why)
    ("http://u:pw@127.0.0.1:99999/base.raw", "http://127.0.0.1:99999/base.raw",
     "the port is not a number from 0 to 65535"),
    ("http://u:pw@[::1/base.raw", "http://***", "not a URL (a bracket that does not close"),
]


@pytest.mark.parametrize(("url", "shown", "why"), BAD_URLS, ids=["port", "bracket"])
def test_a_backing_url_that_names_nothing_is_an_error_not_a_crash(tmp_path, nginx, open_chains, url, shown, why):
    """A hostile image may name any URL: one with a port that is no port, or a bracket that
    does not close, is a BackingFileError naming the image (info says it in one line), and so
    is a stream or a mount onto such a base; its credentials show nowhere."""
    top = tmp_path / "top.qed"
    qemu_img("create", "-f", "qed", "-u", "-b", url, "-F", "raw", str(top), "1M")
    with pytest.raises(BackingFileError, match=re.escape(f"{top}: backing file {shown}: {why}")):
        open_chains(top)
    info = run(FUSESTREAM, "info", "--chain", str(top), check=False)
    assert info.returncode == 1 and info.stderr.count("\n") == 1 and why in info.stderr and "pw" not in info.stderr

    www = tmp_path / "www"
    www.mkdir()
    (www / "base.raw").write_bytes(base_data())
    over = tmp_path / "over-nginx.qed"
    create_top(over, nginx(www).url("base.raw"))
    chain = open_chains(over)
    with pytest.raises(CommandError, match=re.escape(f"base {shown}: {why}")):
        stream.Streamer(chain, lambda event, data: None).start(base=url)
    chain.close()  # the mount's turn
    (tmp_path / "mnt").mkdir()
    mounted = run(MOUNT_HELPER, "-f", "-o", f"base={url}", str(over), str(tmp_path / "mnt"), check=False)
    assert mounted.returncode == 1 and mounted.stderr.startswith(f"mount.fusestream: base {shown}: {why}")
    assert mounted.stderr.count("\n") == 1 and "pw" not in mounted.stderr


@pytest.mark.parametrize("connections", [1, 4])
def test_a_stream_fetches_each_remote_byte_once_whatever_the_connections(tmp_path, fault_server, open_chains,
                                                                        connections):
    """A step prefetches the next before it reads its own pieces, and the source keeps two
    bulk_size reads of staged pieces: steps larger than bulk_size (1 MiB here with one
    connection) would push their own pieces out before reading them, and fetch them again."""
    server = fault_server(random.Random(5).randbytes(8 * MiB))
    create_top(tmp_path / "top.qed", server.url())
    options = HttpOptions(connections=connections, request_size=1 * MiB)
    c = open_chains(tmp_path / "top.qed", confinement=Confinement(http=options))
    run_with_streamer(c, stream_to_end)
    fetched = sum(int(last) - int(first) + 1 for first, last in
                  (request.headers["Range"][6:].split("-") for request in server.requests))
    assert fetched <= 8 * MiB + 2 * 64 * KiB, fetched  # the probes of create and open, and the base once


def test_a_name_that_cannot_be_resolved_against_a_url_is_an_error_not_a_crash(tmp_path, nginx, open_chains):
    """urljoin raises on a bracket that does not close: a remote image naming such a backing
    file is refused in one line, and a ctl base of that shape, tried against each remote
    layer's URL (Chain.base_layer_named), is a rejected command, not an exception that would
    stop the mount."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "base.raw").write_bytes(base_data())
    qemu_img("create", "-f", "qed", "-b", "base.raw", "-F", "raw", str(www / "mid.qed"))
    qemu_img("create", "-f", "qed", "-u", "-b", "x://[", "-F", "raw", str(www / "bad.qed"), "1M")
    server = nginx(www)
    create_top(tmp_path / "bad-top.qed", server.url("bad.qed"), "qed")
    with pytest.raises(BackingFileError, match=re.escape(f"{server.url('bad.qed')}: backing file x://***: not a "
                                                         f"name that resolves against {server.url('bad.qed')}")):
        open_chains(tmp_path / "bad-top.qed")
    create_top(tmp_path / "top.qed", server.url("mid.qed"), "qed")
    chain = open_chains(tmp_path / "top.qed")
    with pytest.raises(CommandError, match="is not in the backing chain"):
        stream.Streamer(chain, lambda event, data: None).start(base="x://[")


@pytest.mark.parametrize("fmt", ["qcow2", "qed"])
def test_qcow2_and_qed_bases_over_a_remote_raw_read_exactly(tmp_path, nginx, open_chains, fmt):
    """A remote image of each format whose relative backing name resolves against its URL."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "base.raw").write_bytes(base_data())
    qemu_img("create", "-f", fmt, "-b", "base.raw", "-F", "raw", str(www / f"mid.{fmt}"))
    qemu_io(www / f"mid.{fmt}", "write -P 0x5a 1M 300K", "write -z 3M 64K", fmt=fmt)
    server = nginx(www)
    create_top(tmp_path / "top.qed", server.url(f"mid.{fmt}"), fmt)
    qemu_io(tmp_path / "top.qed", "write -P 0x77 2M 4K", fmt="qed")
    c = open_chains(tmp_path / "top.qed", writable=False)
    assert [layer.path for layer in c.backing_layers] == [server.url(f"mid.{fmt}"), server.url("base.raw")]
    assert bytes(c.read(0, c.size)) == local_oracle(tmp_path / "top.qed", www / f"mid.{fmt}", tmp_path, fmt)


def test_qemu_reads_the_chain_we_created_over_a_url(tmp_path, nginx):
    www = tmp_path / "www"
    www.mkdir()
    (www / "base.raw").write_bytes(base_data())
    server = nginx(www)
    create_top(tmp_path / "top.qed", server.url("base.raw"))
    chain = json.loads(qemu_img("info", "--backing-chain", "--output=json", str(tmp_path / "top.qed")))
    assert [image["filename"] for image in chain] == [str(tmp_path / "top.qed"), server.url("base.raw")]
    assert chain[0]["backing-filename"] == server.url("base.raw") and chain[1]["virtual-size"] == BASE_SIZE
    info = json.loads(run(FUSESTREAM, "info", "--chain", "--json", str(tmp_path / "top.qed")).stdout)
    assert [image["filename"] for image in info] == [image["filename"] for image in chain]
    assert info[1]["remote"]["server"].startswith("nginx") and info[1]["remote"]["etag"]
    assert info[1]["actual-size"] is None


def test_info_of_a_url_and_of_a_chain_over_one_shows_the_remote_layer_and_a_missing_one_is_one_line(
        tmp_path, nginx):
    www = tmp_path / "www"
    www.mkdir()
    (www / "base.raw").write_bytes(base_data())
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(www / "mid.qcow2"))
    server = nginx(www)
    create_top(tmp_path / "top.qed", server.url("mid.qcow2"), "qcow2")

    alone = json.loads(run(FUSESTREAM, "info", "--json", server.url("mid.qcow2")).stdout)
    assert alone["filename"] == server.url("mid.qcow2") and alone["format"] == "qcow2"
    assert alone["actual-size"] is None and alone["remote"]["server"].startswith("nginx")
    assert alone["full-backing-filename"] == server.url("base.raw")
    shown = run(FUSESTREAM, "info", "--chain", str(tmp_path / "top.qed")).stdout
    assert [line for line in shown.splitlines() if line.startswith("image: ")] == [
        f"image: {tmp_path / 'top.qed'}", f"image: {server.url('mid.qcow2')}", f"image: {server.url('base.raw')}"]
    assert f"backing file (resolved): {server.url('base.raw')}" in shown and "disk size: unavailable" in shown

    qemu_img("create", "-f", "qed", "-b", "mid.qcow2", "-F", "qcow2", str(www / "over.qed"))
    remote_top = json.loads(run(FUSESTREAM, "info", "--chain", "--json", server.url("over.qed")).stdout)
    assert [image["filename"] for image in remote_top] == [server.url(name) for name in
                                                          ("over.qed", "mid.qcow2", "base.raw")]
    assert "No errors were found" in run(FUSESTREAM, "check", server.url("over.qed")).stdout

    missing = run(FUSESTREAM, "info", server.url("gone.raw"), check=False)
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.startswith(f"fusestream: {server.url('gone.raw')}: ") and missing.stderr.count("\n") == 1


def test_the_cli_trusts_a_private_ca_named_by_ssl_cert_file(tmp_path, nginx, tls_files):
    """create, info and check have no remote options: the CA store is OpenSSL's, which the
    standard SSL_CERT_FILE variable replaces (docs/fusestream.md)."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "base.raw").write_bytes(base_data())
    url = nginx(www, tls=tls_files).url("base.raw")
    refused = run(FUSESTREAM, "info", url, check=False)
    assert refused.returncode == 1 and "certificate verification failed" in refused.stderr
    env = {**os.environ, "SSL_CERT_FILE": str(tls_files.ca)}
    run(FUSESTREAM, "create", "-b", url, "-F", "raw", str(tmp_path / "top.qed"), env=env)
    shown = json.loads(run(FUSESTREAM, "info", "--chain", "--json", str(tmp_path / "top.qed"), env=env).stdout)
    assert [image["filename"] for image in shown] == [str(tmp_path / "top.qed"), url]
    assert shown[0]["virtual-size"] == len(base_data())
    assert run(FUSESTREAM, "check", str(tmp_path / "top.qed"), env=env).returncode == 0


def test_the_remote_mount_options():
    opts = parse_options(["nostream,sslverify=off,http_connections=8,http_request_size=2M,http_timeout=2.5",
                          "allowed_origins=HTTPS://Images.Example:443,allowed_origins=http://10.0.0.5:8080"])
    assert http_options(opts) == HttpOptions(sslverify=False, connections=8, request_size=2 * MiB, timeout=2.5,
                                             allowed_origins=("https://images.example", "http://10.0.0.5:8080"))
    for bad, why in [("sslverify=no", "not on or off"), ("http_connections=0", "1 to 64"),
                     ("http_block_size=1000", "power of two"), ("allowed_origins=http://h/path", "not an origin"),
                     ("allowed_origins=ftp://h", "not an origin"), ("http_timeout=soon", "not a number"),
                     ("ca_file=/x,sslverify=off", "contradict")]:
        with pytest.raises(UsageError, match=why):
            parse_options([bad])


# -- mounted: reads, streams and faults -----------------------------------------------------------


def served_chain(tmp_path: Path, data: bytes) -> tuple[Path, Path]:
    """(where top.qed goes, the local copy of the base holding `data`)."""
    local_base = tmp_path / "base.raw"
    local_base.write_bytes(data)
    return tmp_path / "top.qed", local_base


@pytest.fixture(params=["fault-server", "proxy-to-nginx"])
def faulty_origin(request, tmp_path, fault_server, fault_proxy, nginx):
    """faulty_origin(data) -> a FaultServer of `data` as image.raw: the tests' own server, or
    the proxy that injects the same faults in front of nginx serving it."""

    def start(data: bytes):
        if request.param == "fault-server":
            return fault_server(data)
        www = tmp_path / "www"
        www.mkdir()
        (www / "image.raw").write_bytes(data)
        return fault_proxy(nginx(www))

    return start


def mounted_over_fault_server(tmp_path: Path, faulty_origin, mount, seed: int, **url_parts):
    """(server, top, what the chain reads with the base local, the mount) of a top image made
    over the faulty origin's URL (`url_parts`: its userinfo and query), mounted with QUICK
    retries and no stream yet."""
    data = base_data(seed)
    top, local_base = served_chain(tmp_path, data)
    server = faulty_origin(data)
    create_top(top, server.url(**url_parts))
    expected = local_oracle(top, local_base, tmp_path)
    return server, top, expected, mount(top, "nostream", *QUICK)


@pytest.mark.mount
@pytest.mark.parametrize("limit_rate", [None, 2 * MiB])
def test_nginx_mount_reads_exactly_streams_and_keeps_guest_writes(tmp_path, nginx, mount, limit_rate):
    www = tmp_path / "www"
    www.mkdir()
    (www / "base.raw").write_bytes(base_data())
    server = nginx(www, limit_rate=limit_rate)
    create_top(tmp_path / "top.qed", server.url("base.raw"))
    qemu_io(tmp_path / "top.qed", "write -P 0x11 64K 8K", fmt="qed")
    expected = local_oracle(tmp_path / "top.qed", www / "base.raw", tmp_path)
    m = mount(tmp_path / "top.qed", "nostream")
    assert read_raw(m) == expected
    ctl(m, "stream speed=2M")  # long enough for the guest's writes to land during the stream
    guest_write_and_fsync(m, GUEST_WRITES)
    image = wait_stream_end(m)
    assert image["stream"]["state"] == "completed", image["stream"]
    assert read_raw(m) == apply(expected, GUEST_WRITES)
    m.umount()
    assert qemu_check(tmp_path / "top.qed").returncode == 0
    assert qemu_convert(tmp_path / "top.qed", tmp_path / "after.raw") == apply(expected, GUEST_WRITES)
    local = tmp_path / "local.qed"  # the same chain streamed with the base local: the same map
    create_top(local, str(www / "base.raw"))
    qemu_io(local, "write -P 0x11 64K 8K", fmt="qed")
    local_mount = mount(local)
    guest_write_and_fsync(local_mount, GUEST_WRITES)
    assert wait_stream_end(local_mount)["stream"]["state"] == "completed"
    local_mount.umount()
    assert allocated_ranges(tmp_path / "top.qed") == allocated_ranges(local)


def allocated_ranges(image: Path) -> set[tuple[int, int]]:
    """The guest ranges qemu-img map says hold data, per 64 KiB cluster (zeros streamed from a
    remote base stay unallocated, as holes of a local one do)."""
    entries = json.loads(qemu_img("map", "--output=json", str(image)))
    return {(start, start + 65536) for e in entries if e["data"]
            for start in range(e["start"], e["start"] + e["length"], 65536)}


# Faults that retries cure: (fault_server.fault arguments).
TRANSIENT_FAULTS = {
    "drop": {"kind": "drop", "count": 3},
    "stall": {"kind": "stall", "count": 2, "stall": 1.0},
    "500": {"kind": "status", "count": 3, "status": 500},
    "429": {"kind": "status", "count": 3, "status": 429, "retry_after": "0"},
    "range ignored": {"kind": "ignore_range", "count": 2},
    "truncated": {"kind": "truncate", "count": 3},
}


@pytest.mark.mount
@pytest.mark.parametrize("fault", TRANSIENT_FAULTS)
def test_a_transient_fault_is_retried_and_the_stream_completes_exactly(tmp_path, faulty_origin, mount, fault):
    server, top, expected, m = mounted_over_fault_server(tmp_path, faulty_origin, mount, 1)
    server.fault(**TRANSIENT_FAULTS[fault])
    assert read_raw(m) == expected
    assert status_json(m)["remote"][0]["last_error"]  # the faults did hit (a retry on a reused
    # connection that got no answer is not counted: the count may stay 0)
    server.fault(**TRANSIENT_FAULTS[fault])
    ctl(m, "stream")
    guest_write_and_fsync(m, GUEST_WRITES)
    image = wait_stream_end(m)
    assert image["stream"]["state"] == "completed", image["stream"]
    assert read_raw(m) == apply(expected, GUEST_WRITES)
    m.umount()
    assert qemu_check(top).returncode == 0
    assert qemu_convert(top, tmp_path / "after.raw") == apply(expected, GUEST_WRITES)


@pytest.mark.mount
def test_a_lasting_failure_fails_the_stream_gives_eio_serves_local_data_and_a_new_stream_finishes(
        tmp_path, faulty_origin, mount):
    server, top, expected, m = mounted_over_fault_server(
        tmp_path, faulty_origin, mount, 2, userinfo=f"user:{SECRET}@", query=f"X-Amz-Signature={SECRET}")
    guest_write_and_fsync(m, GUEST_WRITES[:1])
    server.fault("status", count=None, status=503)
    ctl(m, "stream")
    image = wait_stream_end(m)
    shown = f"http://127.0.0.1:{server.port}/image.raw?X-Amz-Signature=***"
    assert image["stream"]["state"] == "failed"
    assert shown in image["stream"]["error"] and "HTTP 503" in image["stream"]["error"]
    failed = [e for e in events(m) if e["event"] == "STREAM_FAILED"]
    assert len(failed) == 1 and shown in failed[0]["data"]["error"]
    remote = image["remote"][0]
    assert remote["url"] == shown and remote["retries"] > 0 and "HTTP 503" in remote["last_error"]
    assert f"Remote {shown}:" in (m.mountpoint / "status").read_text()

    fd = os.open(m.raw, os.O_RDONLY)
    try:
        started = time.monotonic()
        with pytest.raises(OSError) as err:
            os.pread(fd, 4096, 3 * MiB)  # remote data, never read before
        assert err.value.errno == errno.EIO and time.monotonic() - started < 5
        assert os.pread(fd, 5000, 100) == GUEST_WRITES[0][1]  # local data still served
    finally:
        os.close(fd)

    server.clear()
    ctl(m, "stream")
    assert wait_stream_end(m)["stream"]["state"] == "completed"
    assert read_raw(m) == apply(expected, GUEST_WRITES[:1])
    texts = [(m.mountpoint / "status").read_text(), (m.mountpoint / "status.json").read_text(),
             (m.mountpoint / "events").read_text(), m.umount()]
    assert all(SECRET not in text for text in texts)
    assert "HTTP 503" in texts[3]  # the log says what happened, without the credentials
    assert qemu_check(top).returncode == 0


@pytest.mark.mount
def test_a_changed_object_fails_the_stream_and_is_never_mixed_in(tmp_path, faulty_origin, mount):
    server, top, expected, m = mounted_over_fault_server(tmp_path, faulty_origin, mount, 3)
    guest_write_and_fsync(m, GUEST_WRITES)
    expected = apply(expected, GUEST_WRITES)
    head = m.raw.open("rb").read(64 * KiB)
    server.change(base_data(4))
    ctl(m, "stream")
    image = wait_stream_end(m)
    assert image["stream"]["state"] == "failed"
    assert "the object changed since it was opened" in image["stream"]["error"]
    assert server.url() in image["stream"]["error"]
    fd = os.open(m.raw, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as err:
            os.pread(fd, 4096, 3 * MiB)
        assert err.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert head == expected[: 64 * KiB]
    m.umount()
    alone = top_alone(top, tmp_path)
    assert qemu_check(alone).returncode == 0
    got = qemu_convert(alone, tmp_path / "after.raw")  # whatever was streamed is the old data
    for start in range(0, BASE_SIZE, 64 * KiB):
        chunk = got[start : start + 64 * KiB]
        assert chunk in (expected[start : start + 64 * KiB], bytes(64 * KiB))
    for offset, data in GUEST_WRITES:  # acknowledged: kept
        assert got[offset : offset + len(data)] == data


# -- S3: presigned URLs ---------------------------------------------------------------------------


@pytest.mark.mount
def test_a_presigned_s3_url_mounts_reads_and_streams_exactly(tmp_path, s3_server, mount):
    data = base_data(5)
    s3_server.put("images", "base.raw", data)
    top, local_base = served_chain(tmp_path, data)
    create_top(top, s3_server.presigned("images", "base.raw"))
    expected = local_oracle(top, local_base, tmp_path)
    m = mount(top, "nostream")
    assert read_raw(m) == expected
    ctl(m, "stream")
    assert wait_stream_end(m)["stream"]["state"] == "completed"
    assert read_raw(m) == expected
    m.umount()
    assert qemu_check(top).returncode == 0


@pytest.mark.mount
def test_a_presigned_url_expiring_mid_stream_fails_it_and_a_new_one_set_with_qemu_img_rebase_finishes_it(
        tmp_path, s3_server, mount):
    """The stream fails with the 403 and its hint; nothing the guest wrote and fsync'd is lost;
    the procedure of docs/mount.fusestream.md (a new URL for the same object, set unsafely)
    finishes the stream with exact data."""
    data = base_data(6)
    s3_server.put("images", "expiring.raw", data)
    top, local_base = served_chain(tmp_path, data)
    create_top(top, s3_server.presigned("images", "expiring.raw"))
    expected = apply(local_oracle(top, local_base, tmp_path), GUEST_WRITES)
    expires = 8  # signed only now, so that the setup above does not use up its time
    url = s3_server.presigned("images", "expiring.raw", expires=expires)
    expiry = time.monotonic() + expires - 1  # X-Amz-Date counts whole seconds
    signature = url.rpartition("X-Amz-Signature=")[2]
    qemu_img("rebase", "-u", "-f", "qed", "-b", url, "-F", "raw", str(top))
    m = mount(top, "nostream", *QUICK)
    ctl(m, f"stream speed={BASE_SIZE // (2 * expires)}")  # twice as long as the URL lasts
    guest_write_and_fsync(m, GUEST_WRITES)
    assert time.monotonic() < expiry, "the test's setup took longer than the URL lasts"
    image = wait_stream_end(m)
    error = image["stream"]["error"]
    assert image["stream"]["state"] == "failed"
    assert 0 < image["stream"]["offset"] < BASE_SIZE  # it expired mid-stream
    assert "HTTP 403" in error and "a presigned URL may have expired" in error
    assert f"{s3_server.endpoint}/images/expiring.raw?" in error and "X-Amz-Signature=***" in error
    assert signature not in (m.mountpoint / "events").read_text() + m.umount()
    qemu_img("rebase", "-u", "-f", "qed", "-b", s3_server.presigned("images", "expiring.raw"), "-F", "raw",
             str(top))
    m = mount(top)
    assert wait_stream_end(m)["stream"]["state"] == "completed"
    assert read_raw(m) == expected
    m.umount()
    assert qemu_check(top).returncode == 0


@pytest.mark.parametrize(("reader", "cached"), [("throttled", False), ("unlimited", False),
                                               ("fragmented", False), ("guest", True), ("copy-on-read", True)])
def test_a_stream_leaves_the_remote_block_cache_to_the_guest(tmp_path, nginx, open_chains, reader, cached):
    """The block cache holds what the guest reads; a stream's data, read once to be stored in
    the top image, goes past it on the bulk connections at any speed and in pieces of any size
    (a throttled stream's small steps, the gaps between clusters the guest wrote), so it pushes
    none of the guest's blocks out. Guest reads are cached, and so are copy-on-read's, which
    must not queue behind the stream's transfers."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "base.raw").write_bytes(random.Random(11).randbytes(BASE_SIZE))  # no zeros: copy-on-read copies all
    create_top(tmp_path / "top.qed", nginx(www).url("base.raw"))
    c = open_chains(tmp_path / "top.qed")
    source = c.layers[1].source
    if reader == "fragmented":  # the guest wrote every other cluster: 64 KiB gaps to copy
        for offset in range(0, BASE_SIZE, 128 * KiB):
            c.write(offset, b"\x5a" * (64 * KiB))
    opened_with = source.cached_blocks  # the open's probe
    if reader in ("guest", "copy-on-read"):
        read = CopyOnRead(Streamer(c, lambda *_: None), WriteErrors("top.raw", lambda *_: None)).read \
            if reader == "copy-on-read" else c.read
        for offset in range(0, BASE_SIZE, 256 * KiB):
            read(offset, 256 * KiB)
    else:
        run_with_streamer(c, functools.partial(stream_to_end, speed=4 * MiB if reader == "throttled" else 0))
    assert (source.cached_blocks > opened_with + 8) is cached, source.cached_blocks


@pytest.mark.mount
def test_a_stream_onto_a_remote_base_stores_its_url_and_shows_it_without_credentials(tmp_path, nginx, mount):
    www = tmp_path / "www"
    www.mkdir()
    (www / "base.raw").write_bytes(base_data(7))
    server = nginx(www)
    url = server.url("base.raw").replace("http://", f"http://user:{SECRET}@")
    create_top(tmp_path / "mid.qed", url)
    qemu_io(tmp_path / "mid.qed", "write -P 0x33 1M 128K", fmt="qed")
    create_top(tmp_path / "top.qed", "mid.qed", "qed")
    expected = local_oracle(tmp_path / "mid.qed", www / "base.raw", tmp_path)
    m = mount(tmp_path / "top.qed", f"base={url}")
    image = wait_stream_end(m)
    assert image["stream"]["state"] == "completed" and image["backing_chain"] == [server.url("base.raw")]
    changed = [e for e in events(m) if e["event"] == "BACKING_CHANGED"]
    assert changed[0]["data"] == {"backing_file": server.url("base.raw"), "base": server.url("base.raw")}
    assert read_raw(m) == expected
    assert SECRET not in (m.mountpoint / "status").read_text() + m.umount()
    info = json.loads(qemu_img("info", "--output=json", str(tmp_path / "top.qed")))
    assert info["backing-filename"] == url  # what the user gave, credentials and all, as QEMU stores it


@pytest.mark.mount
def test_remote_reads_are_answered_by_the_native_thread_that_received_them(tmp_path, nginx, mount):
    """A READ of remote data, which the native threads' map cannot place, is read through the
    chain by the native thread that received it (NativeReads.call_reads), not handed to the
    event loop and on to a worker thread: exact bytes, counted as "called" in status.json."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "base.raw").write_bytes(base_data(3))
    server = nginx(www)
    create_top(tmp_path / "top.qed", server.url("base.raw"))
    expected = local_oracle(tmp_path / "top.qed", www / "base.raw", tmp_path)
    m = mount(tmp_path / "top.qed", "nostream")
    before = status_json(m)["native_reads"]
    offsets = random.Random(4).sample(range(0, BASE_SIZE, 64 * 1024), 24)
    fd = os.open(m.raw, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    try:
        for offset in offsets:
            assert os.preadv(fd, [buf], offset) == 4096
            assert buf[:] == expected[offset : offset + 4096], offset
    finally:
        buf.close()
        os.close(fd)
    counts = status_json(m)["native_reads"]
    assert counts["called"] - before["called"] >= len(offsets), (before, counts)
    # the other requests of the test (open, release, the status.json reads) are forwarded: ~14
    assert counts["forwarded"] - before["forwarded"] < len(offsets), (before, counts)
    m.umount()


def test_reads_in_other_threads_make_the_guest_busy(monkeypatch):
    """Operations.read_unmapped notes the guest from a native thread, on the monotonic clock:
    the stream gives way for GUEST_BUSY_SECONDS after it, as after a read the loop served."""
    guest = GuestActivity()
    now = [1000.0]
    monkeypatch.setattr(stream.time, "monotonic", lambda: now[0])

    async def busy_now_and_later() -> tuple[bool, bool, bool]:
        idle = guest.busy()
        await trio.to_thread.run_sync(guest.note_in_thread)
        busy = guest.busy()
        now[0] += GUEST_BUSY_SECONDS * 1.5
        return idle, busy, guest.busy()

    assert trio.run(busy_now_and_later, clock=trio.testing.MockClock()) == (False, True, False)
