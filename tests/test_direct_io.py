"""The stream's writes bypass the page cache (O_DIRECT) where the file and the alignment allow
it, and fall back to ordinary writes everywhere else without changing a byte."""

from __future__ import annotations

import errno
import mmap
import os

import pytest
from conftest import build_chain, qemu_check, qemu_convert

from fusestream.copy import Copier
from fusestream.sources.local import direct_io_allowed


@pytest.fixture
def spy_pwritev(monkeypatch):
    """The descriptors every pwritev went to."""
    calls: list[int] = []
    real = os.pwritev

    def pwritev(fd, buffers, offset):
        calls.append(fd)
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", pwritev)
    return calls


def test_alignment_rules():
    aligned = memoryview(mmap.mmap(-1, 3 * 4096))
    assert direct_io_allowed(aligned[4096:8192], 8192)
    assert not direct_io_allowed(aligned[512:4608], 0)  # buffer address
    assert not direct_io_allowed(aligned[:4096], 512)  # file offset
    assert not direct_io_allowed(aligned[:1000], 0)  # length
    assert not direct_io_allowed(memoryview(bytes(4096)), 0)  # read-only: never a read target
    assert not direct_io_allowed(aligned[:0], 0)


def test_a_filesystem_without_o_direct_gives_no_twin_and_the_stream_still_works(
    tmp_path, monkeypatch, spy_pwritev, open_chains
):
    real_open = os.open

    def open_without_direct(path, flags, *args):  # what e.g. tmpfs before Linux 6.6 answers
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_without_direct)
    c = build_chain(tmp_path, size=1 << 20, cluster_size=4096)
    expected = qemu_convert(c.top, tmp_path / "expected.raw")
    chain = open_chains(c.top)
    assert chain.top.source.direct.fd == -1
    Copier(chain, base=None).copy_range(0, chain.size)
    assert spy_pwritev and set(spy_pwritev) == {chain.top.source.fd}
    assert chain.read(0, chain.size) == expected


@pytest.mark.parametrize("cluster_size", [4096, 65536])
def test_a_stream_writes_its_clusters_with_o_direct_and_reads_as_qemu_does(
    tmp_path, spy_pwritev, cluster_size, open_chains
):
    # An odd virtual size: the last cluster is partial, so that one append goes through the page cache.
    c = build_chain(tmp_path, size=40 * cluster_size + 1536, cluster_size=cluster_size)
    expected = qemu_convert(c.top, tmp_path / "expected.raw")
    chain = open_chains(c.top)
    direct_fd = chain.top.source.direct.fd
    Copier(chain, base=None).copy_range(0, -(-chain.size // cluster_size) * cluster_size)
    chain.rebase(len(chain.layers))
    assert direct_fd in spy_pwritev, "no bulk write bypassed the page cache"
    assert chain.read(0, chain.size) == expected
    chain.close()
    check = qemu_check(c.top)
    assert check.returncode == 0, check.stdout + check.stderr
    assert qemu_convert(c.top, tmp_path / "after.raw") == expected


def test_guest_writes_stay_in_the_page_cache(tmp_path, spy_pwritev, open_chains):
    c = build_chain(tmp_path, size=1 << 20, cluster_size=4096)
    chain = open_chains(c.top)
    direct_fd = chain.top.source.direct.fd
    chain.write(8192, os.urandom(3 * 4096))
    assert direct_fd not in spy_pwritev
