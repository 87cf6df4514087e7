"""Byte sources alone: a local file's reads, holes, identity, refusals and writes, and
open_source's dispatch."""

from __future__ import annotations

import mmap
import os
import socket
import threading

import pytest

from fusestream.errors import BackingFileError, ImageBusyError, InvalidImageError, SourceError
from fusestream.sources import ReadFor, open_source
from fusestream.sources.http import HttpOptions
from fusestream.sources.local import IOV_MAX, LocalFile

MiB = 1 << 20


@pytest.fixture
def sparse(tmp_path):
    """A 4 MiB file: data in its first and third MiB, holes elsewhere."""
    path = tmp_path / "sparse.raw"
    content = bytearray(4 * MiB)
    content[:MiB] = os.urandom(MiB)
    content[2 * MiB : 3 * MiB] = os.urandom(MiB)
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
        f.write(content[:MiB])
        f.seek(2 * MiB)
        f.write(content[2 * MiB : 3 * MiB])
    return path, bytes(content)


def test_reads_fill_a_buffer_or_stop_at_the_end(sparse):
    path, content = sparse
    source = open_source(str(path))
    try:
        assert (source.name, source.size, source.remote) == (str(path), 4 * MiB, False)
        assert source.read(MiB - 10, 20) == content[MiB - 10 : MiB + 10]
        assert source.read(4 * MiB - 5, 10) == content[-5:]  # fewer only where the file ends
        view = memoryview(bytearray(b"\xa5" * (MiB + 100)))
        assert source.read_into(view, 3 * MiB) == MiB
        assert view[:MiB] == content[3 * MiB :] and view[MiB:] == b"\xa5" * 100
        aligned = memoryview(mmap.mmap(-1, MiB))
        assert source.read_into(aligned, 2 * MiB, ReadFor.GENTLE) == MiB  # through the O_DIRECT twin
        assert aligned == content[2 * MiB : 3 * MiB]
        source.prefetch(0, 4 * MiB)  # a hint: nothing to see but that it does not fail
        assert source.describe() == {}
    finally:
        source.close()
    source.close()  # twice is harmless


def test_data_status_follows_the_holes(sparse):
    path, _ = sparse
    source = LocalFile(str(path))
    try:
        assert source.data_status(0, 4 * MiB) == (True, MiB)
        assert source.data_status(MiB, 4 * MiB) == (False, MiB)
        assert source.data_status(2 * MiB + 5, 100) == (True, 100)
        assert source.data_status(3 * MiB, MiB) == (False, MiB)
    finally:
        source.close()


def test_identity_is_the_file_under_any_name(tmp_path):
    (tmp_path / "a.raw").write_bytes(b"x" * 4096)
    os.link(tmp_path / "a.raw", tmp_path / "hard.raw")
    os.symlink("a.raw", tmp_path / "soft.raw")
    (tmp_path / "b.raw").write_bytes(b"x" * 4096)
    sources = [LocalFile(str(tmp_path / name), lock=False) for name in ("a.raw", "hard.raw", "soft.raw", "b.raw")]
    try:
        identities = [s.identity() for s in sources]
        assert identities[0] == identities[1] == identities[2] != identities[3]
    finally:
        for s in sources:
            s.close()


def test_what_is_not_a_regular_file_is_refused_without_hanging(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock"))
    (tmp_path / "dir").mkdir()
    try:
        for name, problem in (("dir", "is a directory"), ("fifo", "not a regular file"),
                              ("sock", "No such device"), ("missing", "No such file")):
            with pytest.raises(BackingFileError, match=problem):
                LocalFile(str(tmp_path / name))
    finally:
        server.close()


def test_a_writer_excludes_other_users_of_the_file(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(bytes(4096))
    writer = LocalFile(str(path), writable=True)
    try:
        for writable in (False, True):
            with pytest.raises(ImageBusyError):
                LocalFile(str(path), writable=writable)
        LocalFile(str(path), lock=False).close()
    finally:
        writer.close()
    LocalFile(str(path)).close()


def test_writes_of_one_buffer_or_many_all_reach_the_file(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(b"")
    file = LocalFile(str(path), writable=True)
    try:
        file.write(10, b"one buffer")
        many = [bytes([i % 256]) * 3 for i in range(IOV_MAX * 2 + 5)]  # more than one pwritev takes
        file.write(100, many)
        aligned = memoryview(mmap.mmap(-1, 2 * 4096))
        aligned[:] = b"d" * len(aligned)
        file.write(8192, [aligned[:4096], aligned[4096:]], direct=True)  # through the O_DIRECT twin
        file.write(5, b"not aligned, so through the page cache", direct=True)
        file.sync()
        assert file.current_size() == 4 * 4096
        assert path.read_bytes()[100 : 100 + 3 * len(many)] == b"".join(many)
        assert path.read_bytes()[8192:] == b"d" * 8192
        assert path.read_bytes()[5:43] == b"not aligned, so through the page cache"
    finally:
        file.close()


def test_punch_hole_gives_space_back_and_reads_zeros(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(os.urandom(4 * MiB))
    file = LocalFile(str(path), writable=True)
    try:
        before = file.allocated_bytes()
        file.punch_hole(MiB, 2 * MiB)
        assert file.read(MiB, 2 * MiB) == bytes(2 * MiB)
        assert file.allocated_bytes() <= before - 2 * MiB
        assert file.data_status(MiB, MiB) == (False, MiB)
        file.truncate(MiB)
        assert file.current_size() == MiB and file.size == 4 * MiB  # `size` stays the size at open
    finally:
        file.close()


def test_create_never_replaces_a_file_unless_told_nor_one_in_use(tmp_path):
    path = tmp_path / "new.qed"
    LocalFile.create(str(path)).close()
    with pytest.raises(InvalidImageError, match="already exists"):
        LocalFile.create(str(path))
    in_use = LocalFile(str(path))
    try:
        with pytest.raises(ImageBusyError):
            LocalFile.create(str(path), overwrite=True)
    finally:
        in_use.close()
    LocalFile.create(str(path), overwrite=True).close()
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(InvalidImageError, match="FIFO"):
        LocalFile.create(str(tmp_path / "fifo"), overwrite=True)


def test_reads_from_many_threads_at_once(sparse):
    path, content = sparse
    source = LocalFile(str(path))
    errors = []

    def reader(start: int) -> None:
        view = memoryview(bytearray(65536))
        for offset in range(start, 4 * MiB, 8 * 65536):
            if source.read_into(view, offset) != 65536 or view != content[offset : offset + 65536]:
                errors.append(offset)

    threads = [threading.Thread(target=reader, args=(i * 65536,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    source.close()
    assert not errors


def test_a_remote_location_opens_an_http_source_and_its_errors_hide_the_credentials(tmp_path):
    with socket.socket() as unused:  # a loopback port that nobody listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    for url in (f"http://127.0.0.1:{port}/base.raw", f"HTTP://user:secret@127.0.0.1:{port}/base.raw"):
        with pytest.raises(SourceError) as refused:
            open_source(url, http=HttpOptions(retry_time=0.5, retry_delay_min=0.05))
        assert "secret" not in str(refused.value) and f"127.0.0.1:{port}/base.raw" in str(refused.value)
    with pytest.raises(BackingFileError, match="No such file"):
        open_source(str(tmp_path / "http:not-a-url"))
