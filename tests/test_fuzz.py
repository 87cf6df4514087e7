"""Hostile input, fuzzed with hypothesis from valid images that qemu-img made.

Whatever the header, tables or backing name hold: opening either works or fails with one of our
errors (one clear line), reads return exactly what was asked or fail with CorruptionError (EIO for
that range), nothing is ever written to the file, and nothing hangs. Control commands likewise
either parse or are rejected with CommandError.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import hashlib
import random
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import qemu_img, qemu_io
from hypothesis import given
from hypothesis import strategies as st

from fusestream.chain import open_chain
from fusestream.cli import ctl_command
from fusestream.control import MAX_COMMAND_BYTES, decode_command, parse_command
from fusestream.errors import CommandError, CorruptionError, FusestreamError
from fusestream.formats import qed
from fusestream.formats.qed_structs import QED_HEADER, QED_HEADER_SIZE
from fusestream.units import MAX_SIZE

U64 = st.one_of(
    st.integers(0, 2**64 - 1),
    st.sampled_from([0, 1, 2**63, 2**64 - 1, 2**64 - 4096, 2**32, 2**32 - 1, 4095, 4096, 4097, 65536]),
)
U32 = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2, 3, 16, 17, 4096, 2**26, 2**31, 2**32 - 1]))
HEADER_FIELDS = {
    "cluster_size": U32, "table_size": U32, "header_size": U32, "features": U64, "compat_features": U64,
    "autoclear_features": U64, "l1_table_offset": U64, "image_size": U64,
    "backing_filename_offset": U32, "backing_filename_size": U32,
}


@dataclasses.dataclass(frozen=True)
class Seed:
    content: bytes = dataclasses.field(repr=False)  # a failing example's report stays readable


@pytest.fixture(scope="module")
def seed():
    """A valid chain from qemu-img: raw base, QED top with data in two L2 tables."""
    directory = Path(tempfile.mkdtemp(prefix="fusestream-fuzz-"))
    (directory / "base.raw").write_bytes(random.Random(1).randbytes(256 * 1024))
    top = directory / "top.qed"
    qemu_img("create", "-f", "qed", "-o", "cluster_size=4K,table_size=2", "-b", "base.raw", "-F", "raw",
             str(top), "16M")
    qemu_io(top, "write -P 7 0 12k", "write -P 9 5M 4k", "write -z 64k 4k")
    yield Seed(top.read_bytes())
    shutil.rmtree(directory)


def exercise(content: bytes, tmp: Path) -> None:
    """Open the image as a mount would, read it; only our errors may come out, the file must not
    change."""
    (tmp / "base.raw").write_bytes(bytes(256 * 1024))
    path = tmp / "top.qed"
    path.write_bytes(content)
    try:
        chain = open_chain(str(path), writable=False)
    except FusestreamError as err:
        assert str(err).startswith(str(tmp)), err  # the message names the file
        return
    try:
        size = chain.size
        for offset in {0, 4096 * 3, 5 << 20, max(0, size - 8192), size // 2}:
            with contextlib.suppress(CorruptionError):  # EIO for this range: what a hostile table deserves
                assert len(chain.read(offset, 8192)) == min(8192, max(0, size - offset))
    finally:
        chain.close()
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(content).digest()


@given(fields=st.fixed_dictionaries({}, optional=HEADER_FIELDS))
def test_fuzzed_header_fields(seed, tmp_path_factory, fields):
    header = QED_HEADER.parse(seed.content[:QED_HEADER_SIZE])
    header.update(fields)
    exercise(QED_HEADER.build(header) + seed.content[QED_HEADER_SIZE:], tmp_path_factory.mktemp("h"))


@given(flips=st.lists(st.tuples(st.integers(0, 6 * 4096 - 1), st.integers(1, 255)), min_size=1, max_size=40))
def test_flipped_bytes_in_header_and_tables(seed, tmp_path_factory, flips):
    content = bytearray(seed.content)
    for offset, mask in flips:
        content[offset] ^= mask
    exercise(bytes(content), tmp_path_factory.mktemp("f"))


@given(l1=st.dictionaries(st.integers(0, 1023), U64, max_size=4),
       l2=st.dictionaries(st.integers(0, 1023), U64, max_size=8))
def test_hostile_table_entries(seed, tmp_path_factory, l1, l2):
    """Entries near 2^64, pointing at the header, at the L1 table (a loop), at each other."""
    header = QED_HEADER.parse(seed.content[:QED_HEADER_SIZE])
    content = bytearray(seed.content)
    l1_table = array.array("Q", content[header.l1_table_offset : header.l1_table_offset + 8192])
    first_l2 = next(o for o in l1_table if o)
    for table_offset, entries in ((header.l1_table_offset, l1), (first_l2, l2)):
        for index, value in entries.items():
            content[table_offset + 8 * index : table_offset + 8 * index + 8] = value.to_bytes(8, "little")
    exercise(bytes(content), tmp_path_factory.mktemp("t"))


@given(name=st.binary(min_size=1, max_size=300))
def test_hostile_backing_names(seed, tmp_path_factory, name):
    header = QED_HEADER.parse(seed.content[:QED_HEADER_SIZE])
    header.update({"backing_filename_offset": QED_HEADER_SIZE, "backing_filename_size": len(name)})
    content = QED_HEADER.build(header) + name + seed.content[QED_HEADER_SIZE + len(name) :]
    exercise(content, tmp_path_factory.mktemp("n"))


@given(text=st.one_of(st.text(max_size=200), st.sampled_from([
    "stream base=", "stream speed=1E", "speed 99999999999999999999999999P", "rebase ''", "stream base=a base=b",
    "pause\x00", "\n\n", "stream speed=-1", "speed 1.5", "speed 0.5", "resume\r\n",
    "speed " + "9" * 400, "stream base=/a\x00b", "stream 'base=/vm dir/b.raw'", "rebase '/a\"b\\c=d'",
])))
def test_fuzzed_control_commands(text):
    try:
        verb, args = parse_command(text)
    except CommandError:
        return
    assert verb in ("stream", "speed", "pause", "resume", "cancel")
    assert all(isinstance(v, int) and v >= 0 for k, v in args.items() if k == "speed")


CTL_WRITES = st.one_of(
    st.binary(max_size=300),
    st.integers(0, 10**500).map(lambda n: f"speed {n}\n".encode()),
    st.integers(0, 10**500).map(lambda n: f"stream speed={n}P\n".encode()),
    st.binary(max_size=64).map(lambda path: b"stream base=/" + path + b"\n"),  # NULs, controls, non-UTF-8
    st.integers(MAX_COMMAND_BYTES - 64, 2 * 1024 * 1024).map(lambda n: b"rebase /" + b"a" * n + b"\n"),
    st.text(alphabet=st.sampled_from(" '\"\\=ab/\t"), max_size=40).map(lambda path: f"rebase {path}\n".encode()),
)


@given(raw=CTL_WRITES)
def test_fuzzed_control_writes(raw):
    """Whatever one ctl write holds (huge numbers, NUL, non-UTF-8, megabyte lines, quotes): it
    is one valid command or a CommandError, and a long one is refused without being parsed."""
    try:
        verb, args = parse_command(decode_command(raw))
    except CommandError:
        return
    assert len(raw) <= MAX_COMMAND_BYTES
    assert verb in ("stream", "speed", "pause", "resume", "cancel")
    assert all(0 <= v <= MAX_SIZE for k, v in args.items() if k == "speed")
    assert all(v and "\0" not in v for k, v in args.items() if k == "base")


@given(path=st.text(min_size=1, max_size=200).filter(lambda p: not any(c < " " or c == "\x7f" for c in p)))
def test_any_path_without_controls_goes_through_ctl(path):
    """What the CLI sends for a path is what the daemon reads back."""
    assert parse_command(ctl_command(["rebase", path]) + "\n") == ("stream", {"base": path})


def test_writes_never_touch_metadata_of_a_hostile_image(seed, tmp_path):
    """A data cluster entry aimed at the L1 table: a guest write there must fail, not overwrite
    the table."""
    header = QED_HEADER.parse(seed.content[:QED_HEADER_SIZE])
    content = bytearray(seed.content)
    l1_table = array.array("Q", content[header.l1_table_offset : header.l1_table_offset + 8192])
    first_l2 = next(o for o in l1_table if o)
    content[first_l2 : first_l2 + 8] = header.l1_table_offset.to_bytes(8, "little")
    (tmp_path / "base.raw").write_bytes(bytes(4096))
    path = tmp_path / "top.qed"
    path.write_bytes(bytes(content))
    image = qed.open_image(str(path), writable=True)
    try:
        with pytest.raises(CorruptionError):
            image.write(100, b"overwrite the L1 table?", below=None)
    finally:
        image.close()
    assert path.read_bytes() == bytes(content)
