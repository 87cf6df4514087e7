"""Web servers on loopback for the remote-source tests, as fixtures (registered by conftest):

* `nginx`: Debian's nginx serving a directory, optionally rate-limited per connection
  (`limit_rate`, a WAN stand-in) and over TLS, with its config, pid and logs in a temp dir;
* `fault_server`: one object served by a small threaded server of our own, with switchable
  faults (dropped connections, stalls, 5xx/429, Range ignored, a changed object, a truncated
  body) and a record of the requests it got;
* `fault_proxy`: the same faults in front of nginx: what it does not fault is forwarded there
  and nginx's answer relayed as it came (a changed object is a file changed in nginx's root);
* `raw_server`: answers written byte for byte by the test (malformed or mismatched ones), one
  connection at a time, each answer sent in pieces of a chosen size;
* `tls_files`: a private CA and a server certificate for 127.0.0.1 and localhost;
* `s3_server`: moto's S3 on loopback, with presigned GET URLs.

Every server is stopped at teardown. Only 127.0.0.1 is ever listened on or contacted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import email.utils
import hashlib
import http.client
import http.server
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 10.0


def free_port() -> int:
    """A port free on loopback right now (nginx cannot report the one it picks for port 0)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_listening(port: int, alive=lambda: True, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise AssertionError(f"the server for port {port} exited before it listened")
        try:
            socket.create_connection((LOOPBACK, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"nothing listens on {LOOPBACK}:{port} after {timeout} s")


# -- nginx -----------------------------------------------------------------------------------------


NGINX_CONF = """\
{user}
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    server {{
        listen {host}:{port}{ssl};
        {tls}
        root {root};
        {limit_rate}
    }}
}}
"""


@dataclasses.dataclass
class NginxServer:
    """One nginx master process of the tests' own (stop() is idempotent)."""

    root: Path
    state_dir: Path
    port: int
    scheme: str
    process: subprocess.Popen | None = None

    def url(self, name: str) -> str:
        return f"{self.scheme}://{LOOPBACK}:{self.port}/{name}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["nginx", "-p", str(self.state_dir), "-e", str(self.state_dir / "error.log"),
             "-c", str(self.state_dir / "nginx.conf"), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_listening(self.port, alive=lambda: self.process.poll() is None)
        except AssertionError:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # nginx's fast shutdown
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stderr.close()
        self.process = None


def start_nginx(root: Path, state_dir: Path, limit_rate: int | None = None,
                tls: TlsFiles | None = None) -> NginxServer:
    """nginx serving `root` on a free loopback port; `limit_rate`: bytes/s per connection."""
    state_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    tls_lines = f"ssl_certificate {tls.cert}; ssl_certificate_key {tls.key};" if tls else ""
    (state_dir / "nginx.conf").write_text(NGINX_CONF.format(
        user="user root;" if os.geteuid() == 0 else "",  # workers must read pytest's 0700 temp dirs
        dir=state_dir, host=LOOPBACK, port=port, ssl=" ssl" if tls else "", tls=tls_lines, root=root,
        limit_rate=f"limit_rate {limit_rate};" if limit_rate else ""))
    server = NginxServer(root, state_dir, port, "https" if tls else "http")
    server.start()
    return server


@pytest.fixture
def nginx(tmp_path_factory) -> Iterator:
    """nginx(root, limit_rate=None, tls=None) -> a running NginxServer, stopped at teardown."""
    servers: list[NginxServer] = []

    def start(root: Path, limit_rate: int | None = None, tls: TlsFiles | None = None) -> NginxServer:
        server = start_nginx(root, tmp_path_factory.mktemp("nginx"), limit_rate, tls)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


# -- TLS -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the CA's certificate, for ca_file
    cert: Path  # the server's certificate, signed by the CA, for 127.0.0.1 and localhost
    key: Path


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def make_tls_files(directory: Path) -> TlsFiles:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False), critical=True)
        else:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = certificate("fusestream test CA", ca_key, "fusestream test CA", ca_key, ca=True)
    server_cert = certificate(LOOPBACK, server_key, "fusestream test CA", ca_key, ca=False)
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return files


# -- the fault-injecting server --------------------------------------------------------------------


FAULTS = ("drop", "stall", "status", "ignore_range", "truncate")
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclasses.dataclass
class Fault:
    kind: str  # one of FAULTS
    count: int | None  # requests it hits; None: every one until cleared
    status: int = 503
    retry_after: str | None = None
    stall: float = 2.0  # seconds without a byte, then the connection is dropped


@dataclasses.dataclass(frozen=True)
class Request:
    target: str  # path and query as sent
    headers: dict[str, str]


class FaultServer:
    """One object at every path, with Range, If-Range, ETag and Last-Modified as a web server
    gives them, unless a fault says otherwise. Thread-safe; stop() and start() keep the port."""

    def __init__(self, data: bytes, validators: bool = True):
        self.data = data
        self.validators = validators
        self.honour_if_range = True
        self.etag, self.last_modified = self._validators_of(data, 0)
        self.generation = 0
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self._fault: Fault | None = None
        self._connections: set[socket.socket] = set()
        self._httpd: _QuietHTTPServer | None = None
        self.port = 0
        self.start()

    def url(self, name: str = "image.raw", userinfo: str = "", query: str = "") -> str:
        return f"http://{userinfo}{LOOPBACK}:{self.port}/{name}" + (f"?{query}" if query else "")

    # -- control

    def fault(self, kind: str, count: int | None = 1, **params) -> None:
        assert kind in FAULTS, kind
        with self.lock:
            self._fault = Fault(kind, count, **params)

    def clear(self) -> None:
        with self.lock:
            self._fault = None

    def change(self, data: bytes, honour_if_range: bool = True) -> None:
        """Serve another object from now on, with new validators; `honour_if_range=False`: a
        server that answers ranges of it whatever If-Range says."""
        with self.lock:
            self.generation += 1
            self.data, self.honour_if_range = data, honour_if_range
            self.etag, self.last_modified = self._validators_of(data, self.generation)

    def start(self) -> None:
        handler = type("Handler", (_FaultHandler,), {"fault_server": self})
        httpd = _QuietHTTPServer((LOOPBACK, self.port), handler)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        threading.Thread(target=httpd.serve_forever, args=(0.05,), name=f"fault-server-{self.port}",
                         daemon=True).start()

    def stop(self) -> None:
        """Stop listening and cut every open connection: the server is gone."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd = None
        with self.lock:
            connections, self._connections = set(self._connections), set()
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed by its handler
                continue

    # -- for the handler

    def _validators_of(self, data: bytes, generation: int) -> tuple[str, str]:
        when = 1_700_000_000 + generation * 60
        return f'"{hashlib.sha256(data).hexdigest()[:16]}"', email.utils.formatdate(when, usegmt=True)

    def take_fault(self) -> Fault | None:
        with self.lock:
            fault = self._fault
            if fault is not None and fault.count is not None:
                fault.count -= 1
                if fault.count <= 0:
                    self._fault = None
            return fault

    def answer(self, handler: http.server.BaseHTTPRequestHandler, kind: str | None) -> None:
        """Answer a GET that no fault stopped (`kind`: a fault that changes the answer, or None)."""
        with self.lock:
            data, etag, last_modified, honour = self.data, self.etag, self.last_modified, self.honour_if_range
        start, stop = 0, len(data)
        ranged = False
        match = _RANGE.fullmatch(handler.headers.get("Range", ""))
        if_range = handler.headers.get("If-Range")
        if match and kind != "ignore_range" and (not honour or if_range in (None, etag, last_modified)):
            start = int(match[1])
            stop = min(int(match[2]) + 1, len(data)) if match[2] else len(data)
            if start >= len(data):
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{len(data)}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            ranged = True
        handler.send_response(206 if ranged else 200)
        if ranged:
            handler.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        if self.validators:
            handler.send_header("ETag", etag)
            handler.send_header("Last-Modified", last_modified)
        handler.send_header("Accept-Ranges", "bytes")
        handler.send_header("Content-Length", str(stop - start))
        handler.end_headers()
        body = memoryview(data)[start:stop]
        if kind == "truncate":
            handler.wfile.write(body[: len(body) // 2])
            handler.close_connection = True
            return
        handler.wfile.write(body)


class _QuietHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request, client_address) -> None:
        """A client that hung up is part of the faults tested; anything else is printed."""
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)


class _FaultHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go in two writes: no 40 ms delayed-ACK wait
    fault_server: FaultServer

    def setup(self) -> None:
        super().setup()
        with self.fault_server.lock:
            self.fault_server._connections.add(self.connection)

    def finish(self) -> None:
        with self.fault_server.lock:
            self.fault_server._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        """Quiet: the tests read `requests` instead."""

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's name)
        self.send_error(405)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        server = self.fault_server
        with server.lock:
            server.requests.append(Request(self.path, dict(self.headers.items())))
        fault = server.take_fault()
        kind = fault.kind if fault else None
        if kind == "drop":
            self.close_connection = True
            return
        if kind == "stall":
            time.sleep(fault.stall)
            self.close_connection = True
            return
        if kind == "status":
            self.send_response(fault.status)
            if fault.retry_after is not None:
                self.send_header("Retry-After", fault.retry_after)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        server.answer(self, kind)


class FaultProxy(FaultServer):
    """FaultServer's faults in front of nginx: a request it does not fault is forwarded with its
    Range and If-Range (no Range for ignore_range) and nginx's answer relayed as it came, its
    body cut in the middle for truncate. change() changes the file in nginx's root, so that
    nginx's own ETag, Last-Modified and If-Range say so."""

    def __init__(self, upstream: NginxServer):
        self.upstream = upstream
        super().__init__(b"")

    def change(self, data: bytes, honour_if_range: bool = True, name: str = "image.raw") -> None:
        assert honour_if_range, "nginx always honours If-Range"
        path = self.upstream.root / name
        mtime = path.stat().st_mtime + 60  # nginx's validators are its mtime and size
        new = path.with_name(name + ".new")
        new.write_bytes(data)
        os.utime(new, (mtime, mtime))
        os.replace(new, path)  # a request already on its way keeps reading the old file whole

    def answer(self, handler: http.server.BaseHTTPRequestHandler, kind: str | None) -> None:
        asked = {name: handler.headers[name] for name in ("Range", "If-Range") if name in handler.headers}
        if kind == "ignore_range":
            asked.pop("Range", None)
        upstream = http.client.HTTPConnection(LOOPBACK, self.upstream.port, timeout=10)
        try:
            upstream.request("GET", handler.path, headers=asked)
            reply = upstream.getresponse()
            handler.send_response_only(reply.status, reply.reason)
            for name, value in reply.getheaders():
                if name.lower() not in ("connection", "keep-alive", "transfer-encoding"):
                    handler.send_header(name, value)
            handler.end_headers()
            left = int(reply.getheader("Content-Length", "0"))
            if kind == "truncate":
                left //= 2
                handler.close_connection = True
            while left > 0:
                chunk = reply.read(min(left, 1 << 16))
                if not chunk:
                    raise ConnectionError("nginx closed the connection in the middle of a body")
                handler.wfile.write(chunk)
                left -= len(chunk)
        finally:
            upstream.close()


@pytest.fixture
def fault_server() -> Iterator:
    """fault_server(data, validators=True) -> a running FaultServer, stopped at teardown."""
    servers: list[FaultServer] = []

    def start(data: bytes, validators: bool = True) -> FaultServer:
        server = FaultServer(data, validators)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def fault_proxy() -> Iterator:
    """fault_proxy(nginx_server) -> a running FaultProxy in front of it, stopped at teardown."""
    proxies: list[FaultProxy] = []

    def start(upstream: NginxServer) -> FaultProxy:
        proxy = FaultProxy(upstream)
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.stop()


# -- answers written by the test ------------------------------------------------------------------


RANGE_ASKED = re.compile(rb"\r\nRange: bytes=(\d+)-(\d+)\r\n")


class RawServer:
    """A server whose every answer is `answer(first, last)` (the Range asked), bytes sent as they
    are, in pieces of `piece` bytes (or parts of bytes sent one after another: a generator that
    sleeps between them is a slow server); it closes a connection after `per_connection` answers.
    Records how many connections it accepted."""

    def __init__(self, answer, piece: int = 1 << 16, per_connection: int = 100):
        self.answer, self.piece, self.per_connection = answer, piece, per_connection
        self.connections = 0
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._serve, name=f"raw-server-{self.port}", daemon=True).start()

    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/image.raw"

    def stop(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() under way
        self._listener.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # stopped
                return
            self.connections += 1
            with conn, contextlib.suppress(ConnectionError):  # a client hanging up is part of the tests
                self._answer_requests(conn)

    def _answer_requests(self, conn: socket.socket) -> None:
        received = b""
        for _ in range(self.per_connection):
            while b"\r\n\r\n" not in received:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                received += chunk
            request, _, received = received.partition(b"\r\n\r\n")
            asked = RANGE_ASKED.search(request + b"\r\n")
            reply = self.answer(int(asked[1]), int(asked[2]))
            for part in [reply] if isinstance(reply, bytes) else reply:
                for start in range(0, len(part), self.piece):
                    conn.sendall(part[start : start + self.piece])


@pytest.fixture
def raw_server() -> Iterator:
    """raw_server(answer, piece=64 KiB, per_connection=100) -> a running RawServer, stopped at
    teardown."""
    servers: list[RawServer] = []

    def start(answer, piece: int = 1 << 16, per_connection: int = 100) -> RawServer:
        server = RawServer(answer, piece, per_connection)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


# -- S3 (moto) -------------------------------------------------------------------------------------


S3_EXPIRED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
              b"<Message>Request has expired</Message></Error>")


class PresignExpiry:
    """WSGI middleware: S3's expiry check of a presigned (SigV4 query) URL, 403 AccessDenied
    once X-Amz-Date + X-Amz-Expires has passed. moto 5 serves expired URLs as valid ones."""

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        if "X-Amz-Date" in query and "X-Amz-Expires" in query:
            signed = datetime.datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ")
            expires = signed.replace(tzinfo=datetime.UTC) + datetime.timedelta(
                seconds=int(query["X-Amz-Expires"][0]))
            if datetime.datetime.now(datetime.UTC) > expires:
                start_response("403 Forbidden", [("Content-Type", "application/xml"),
                                                 ("Content-Length", str(len(S3_EXPIRED)))])
                return [S3_EXPIRED]
        return self.app(environ, start_response)


@dataclasses.dataclass
class S3Server:
    endpoint: str
    client: object  # a boto3 S3 client for the endpoint

    def put(self, bucket: str, key: str, data: bytes) -> None:
        buckets = {b["Name"] for b in self.client.list_buckets().get("Buckets", [])}
        if bucket not in buckets:
            self.client.create_bucket(Bucket=bucket)
        self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def presigned(self, bucket: str, key: str, expires: int = 3600) -> str:
        return self.client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                  ExpiresIn=expires)


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 on a free loopback port (path-style addressing, SigV4 presigned URLs)."""
    import boto3
    from botocore.config import Config
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    httpd = make_server(LOOPBACK, 0, PresignExpiry(DomainDispatcherApplication(create_backend_app)), threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, name="moto-s3", daemon=True)
    thread.start()
    endpoint = f"http://{LOOPBACK}:{httpd.server_port}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing",
                              config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))
        yield S3Server(endpoint, client)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
