"""qcow2 backing layers, with qemu-img and qemu-io as the oracle: reads, block status, chains of
qcow2, QED and raw, streams, the CLI, and every feature refused at open."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from conftest import (
    FUSESTREAM,
    qemu_check,
    qemu_convert,
    qemu_img,
    qemu_io,
    read_alone,
    run,
    run_with_streamer,
    stream_to_end,
)

from fusestream.chain import open_layer
from fusestream.errors import CorruptionError, InvalidImageError, UnsupportedImageError
from fusestream.formats.layer import BlockStatus
from fusestream.formats.qcow2 import Qcow2Image
from fusestream.formats.qcow2_structs import (
    QCOW2_HEADER_V2,
    QCOW2_HEADER_V3,
    QCOW2_INCOMPAT_CORRUPT,
    QCOW2_V2_HEADER_LENGTH,
    QCOW2_V3_HEADER_LENGTH,
    QCOW_OFLAG_COMPRESSED,
    compressed_descriptor,
)
from fusestream.sources import ReadFor, open_source

SIZE = 8 * 1024 * 1024
READS = 300


def compressible_source(path: Path, size: int = SIZE, seed: int = 1) -> Path:
    """A raw disk with holes, runs of one byte and repeated random text: it compresses, and
    `qemu-img convert` leaves its zero runs unallocated."""
    rng = random.Random(seed)
    data = bytearray(size)
    for _ in range(120):
        length = rng.randrange(1, 200_000)
        at = rng.randrange(size - length)
        data[at : at + length] = (bytes([rng.randrange(1, 256)]) * length if rng.random() < 0.3
                                  else (rng.randbytes(97) * (length // 97 + 1))[:length])
    path.write_bytes(data)
    return path


def convert(tmp: Path, name: str, *options: str, source: Path | None = None) -> Path:
    out = tmp / name
    qemu_img("convert", *options, "-O", "qcow2", str(source or compressible_source(tmp / "source.raw")), str(out))
    return out


def extended_l2_image(tmp: Path) -> Path:
    """Extended L2 entries with partial subcluster writes, zeroed subclusters and clusters."""
    image = tmp / "extl2.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64K", str(image), str(SIZE))
    qemu_io(image, "write -P 1 4k 6k", "write -P 2 100k 3k", "write -z 70k 4k", "write -z 1M 64k",
            "write -P 3 2M 64k", "write -z 2M 2k", "write -P 4 3M 1M", "write -z 3200k 1k", fmt="qcow2")
    return image


IMAGES = {
    "zlib": lambda tmp: convert(tmp, "zlib.qcow2", "-c"),
    "zstd": lambda tmp: convert(tmp, "zstd.qcow2", "-c", "-o", "compression_type=zstd"),
    "compat-0.10": lambda tmp: convert(tmp, "v2.qcow2", "-o", "compat=0.10"),
    "compat-0.10-zlib-512": lambda tmp: convert(tmp, "v2c.qcow2", "-c", "-o", "compat=0.10,cluster_size=512"),
    "cluster-512": lambda tmp: convert(tmp, "c512.qcow2", "-o", "cluster_size=512"),
    "cluster-2M": lambda tmp: convert(tmp, "c2m.qcow2", "-o", "cluster_size=2M"),
    "cluster-2M-zstd": lambda tmp: convert(tmp, "c2mz.qcow2", "-c", "-o", "cluster_size=2M,compression_type=zstd"),
    "extended-l2": extended_l2_image,
}


@pytest.fixture(params=sorted(IMAGES))
def image(request, tmp_path) -> Path:
    return IMAGES[request.param](tmp_path)


def random_ranges(size: int, count: int, seed: int = 7) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    ranges = []
    for _ in range(count):
        length = rng.choice([1, 511, 4096, 5000, 65537, 300_000])
        ranges.append((rng.randrange(size - min(length, size - 1)), length))
    return ranges


def qemu_runs(image: Path) -> list[tuple[int, int, BlockStatus]]:
    """What `qemu-img map` says the top layer holds, as merged (start, end, status) runs."""
    runs = []
    for e in json.loads(qemu_img("map", "--output=json", str(image))):
        if e["depth"] > 0 or not e["present"]:
            status = BlockStatus.UNALLOCATED
        else:
            status = BlockStatus.FOUND if e["data"] else BlockStatus.ZERO
        runs.append((e["start"], e["start"] + e["length"], status))
    return merge_runs(runs)


def our_runs(layer) -> list[tuple[int, int, BlockStatus]]:
    runs, pos = [], 0
    while pos < layer.size:
        status, length = layer.block_status(pos, layer.size - pos)
        assert length > 0
        runs.append((pos, pos + length, status))
        pos += length
    return merge_runs(runs)


def merge_runs(runs):
    merged = []
    for start, end, status in runs:
        if merged and merged[-1][2] is status and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end, status)
        else:
            merged.append((start, end, status))
    return merged


# -- the format --------------------------------------------------------------------------------


def test_headers_parse_and_build_back_byte_for_byte(tmp_path):
    for name in ("zlib", "compat-0.10"):
        raw = IMAGES[name](tmp_path).read_bytes()
        header = QCOW2_HEADER_V2.parse(raw)
        assert QCOW2_HEADER_V2.build(header) == raw[:QCOW2_V2_HEADER_LENGTH]
        if header.version == 3:
            v3 = QCOW2_HEADER_V3.parse(raw[QCOW2_V2_HEADER_LENGTH:])
            assert QCOW2_HEADER_V3.build(v3) == raw[QCOW2_V2_HEADER_LENGTH:QCOW2_V3_HEADER_LENGTH]


def test_reads_are_byte_identical_to_qemu(tmp_path, image):
    expected = qemu_convert(image, tmp_path / "expected.raw")
    layer = Qcow2Image(open_source(str(image)))
    try:
        assert layer.size == len(expected)
        assert read_alone(layer, 0, layer.size) == expected
        for offset, length in random_ranges(layer.size, READS):
            length = min(length, layer.size - offset)
            assert read_alone(layer, offset, length) == expected[offset : offset + length], (offset, length)
            assert read_alone(layer, offset, length, ReadFor.GENTLE) == expected[offset : offset + length]
    finally:
        layer.close()


def test_block_status_matches_qemu_img_map(image):
    layer = Qcow2Image(open_source(str(image)))
    try:
        assert our_runs(layer) == qemu_runs(image)
    finally:
        layer.close()


def test_compressed_clusters_are_data_and_zero_clusters_zero(tmp_path):
    """The oracle's own statuses, so that the comparison above cannot pass on trivial images."""
    zlib = IMAGES["zlib"](tmp_path)
    statuses = {status for _, _, status in qemu_runs(zlib)}
    assert statuses == {BlockStatus.FOUND, BlockStatus.UNALLOCATED}
    assert {status for _, _, status in qemu_runs(extended_l2_image(tmp_path))} == set(BlockStatus)


def test_facts_of_the_header(tmp_path):
    v2 = Qcow2Image(open_source(str(IMAGES["compat-0.10-zlib-512"](tmp_path))))
    zstd = Qcow2Image(open_source(str(IMAGES["zstd"](tmp_path))))
    extl2 = Qcow2Image(open_source(str(extended_l2_image(tmp_path))))
    try:
        assert (v2.compat, v2.cluster_size, v2.compression_type, v2.extended_l2) == ("0.10", 512, "zlib", False)
        assert (zstd.compat, zstd.cluster_size, zstd.compression_type) == ("1.1", 65536, "zstd")
        assert extl2.extended_l2 and extl2.subcluster_size == 2048
    finally:
        for layer in (v2, zstd, extl2):
            layer.close()


def test_sixteen_small_reads_of_a_compressed_cluster_inflate_it_once(tmp_path):
    source = tmp_path / "source.raw"
    source.write_bytes(b"fusestream" * (SIZE // 10) + bytes(SIZE % 10))
    layer = Qcow2Image(open_source(str(convert(tmp_path, "zlib.qcow2", "-c", source=source))))
    try:
        for offset in range(1 << 20, (1 << 20) + 65536, 4096):
            assert read_alone(layer, offset, 4096) == source.read_bytes()[offset : offset + 4096]
        assert layer.inflations == 1
    finally:
        layer.close()


def test_the_inflated_cluster_cache_is_bounded(tmp_path):
    layer = Qcow2Image(open_source(str(IMAGES["zlib"](tmp_path))), cluster_cache_bytes=4 * 65536)
    try:
        read_alone(layer, 0, layer.size)
        assert len(layer._clusters) == 4
    finally:
        layer.close()


@pytest.mark.parametrize("read_for", [ReadFor.STREAM, ReadFor.GENTLE, ReadFor.GUEST])
def test_compressed_clusters_are_read_and_kept_as_their_reader_asks(tmp_path, monkeypatch, read_for):
    """A compressed cluster's bytes are read with the caller's ReadFor (a remote source's bulk
    lane for the stream, not its block cache) and prefetched the same way."""
    layer = Qcow2Image(open_source(str(IMAGES["zlib"](tmp_path))))
    asked: list[tuple[str, ReadFor]] = []
    read_into, prefetch = layer.source.read_into, layer.source.prefetch
    monkeypatch.setattr(layer.source, "read_into", lambda view, offset, how=ReadFor.GUEST: asked.append(
        ("read", how)) or read_into(view, offset, how))
    monkeypatch.setattr(layer.source, "prefetch", lambda offset, length, how=ReadFor.GUEST: asked.append(
        ("prefetch", how)) or prefetch(offset, length, how))
    try:
        layer.prefetch(0, layer.size, read_for)
        assert read_alone(layer, 0, layer.size, read_for) == qemu_convert(layer.path, tmp_path / "expected.raw")
        assert layer.inflations > 0 and {"read", "prefetch"} == {what for what, _ in asked}
        assert {how for _, how in asked} == {read_for}
    finally:
        layer.close()


# -- chains ------------------------------------------------------------------------------------


def write_random(image: Path, tmp: Path, rng: random.Random, fmt: str, count: int = 10, zero: bool = True) -> None:
    """Random data at random places, then (with `zero`) a cluster of zeros written by QEMU."""
    for _ in range(count):
        length = rng.randrange(1, 200_000)
        (tmp / "pattern").write_bytes(rng.randbytes(length))
        qemu_io(image, f"write -s {tmp / 'pattern'} {rng.randrange(SIZE - length)} {length}", fmt=fmt)
    if zero:
        qemu_io(image, f"write -z {rng.randrange(SIZE // 65536) * 65536} 65536", fmt=fmt)


def qcow2_chain(tmp: Path) -> tuple[Path, list[Path]]:
    """raw base <- zlib-compressed qcow2 <- qcow2 v2 <- extended-L2 qcow2 <- QED top, every layer
    written by QEMU; returns the top and the backing files, top first."""
    rng = random.Random(5)
    base = compressible_source(tmp / "base.raw", seed=2)
    (tmp / "full.raw").write_bytes(rng.randbytes(SIZE))
    q1 = tmp / "q1.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-B", base.name, "-F", "raw", str(tmp / "full.raw"), str(q1))
    (tmp / "full.raw").unlink()
    q2, q3, top = tmp / "q2.qcow2", tmp / "q3.qcow2", tmp / "top.qed"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", "-b", q1.name, "-F", "qcow2", str(q2))
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on", "-b", q2.name, "-F", "qcow2", str(q3))
    write_random(q2, tmp, rng, "qcow2")
    write_random(q3, tmp, rng, "qcow2")
    qemu_io(q3, "write -z 4k 2k", fmt="qcow2")
    qemu_img("create", "-f", "qed", "-b", q3.name, "-F", "qcow2", str(top))
    write_random(top, tmp, rng, "qed", count=4, zero=False)  # QEMU writes zeros over its data as data
    return top, [q3, q2, q1, base]


def test_a_three_deep_qcow2_chain_over_raw_reads_as_qemu_reads_it(tmp_path, open_chains):
    top, backing = qcow2_chain(tmp_path)
    expected = qemu_convert(top, tmp_path / "expected.raw")
    c = open_chains(top, writable=False)
    assert [layer.path for layer in c.layers[1:]] == [str(p) for p in backing]
    assert [layer.format_name for layer in c.layers] == ["qed", "qcow2", "qcow2", "qcow2", "raw"]
    assert c.read(0, SIZE) == expected
    for offset, length in random_ranges(SIZE, READS, seed=3):
        assert c.read(offset, length) == expected[offset : offset + length], (offset, length)
    for layer in c.layers[1:4]:
        assert our_runs(layer) == qemu_runs(Path(layer.path))


def test_qcow2_over_qed_and_qed_over_qcow2(tmp_path, open_chains):
    rng = random.Random(9)
    base = compressible_source(tmp_path / "base.raw", seed=4)
    low, mid, high, top = (tmp_path / n for n in ("low.qed", "mid.qcow2", "high.qed", "top.qed"))
    qemu_img("create", "-f", "qed", "-b", base.name, "-F", "raw", str(low))
    qemu_img("create", "-f", "qcow2", "-b", low.name, "-F", "qed", str(mid))
    qemu_img("create", "-f", "qed", "-b", mid.name, "-F", "qcow2", str(high))
    for layer, fmt in ((low, "qed"), (mid, "qcow2"), (high, "qed")):
        write_random(layer, tmp_path, rng, fmt)
    qemu_img("create", "-f", "qed", "-b", high.name, "-F", "qed", str(top))
    expected = qemu_convert(top, tmp_path / "expected.raw")
    c = open_chains(top, writable=False)
    assert [layer.format_name for layer in c.layers] == ["qed", "qed", "qcow2", "qed", "raw"]
    for offset, length in random_ranges(SIZE, READS, seed=4):
        assert c.read(offset, length) == expected[offset : offset + length], (offset, length)


def test_a_qcow2_backing_format_extension_is_honoured(tmp_path, open_chains):
    """A qcow2 image that says its backing file is raw: a QED image below it is read as raw
    bytes, as QEMU reads it, not probed."""
    (tmp_path / "below.qed").write_bytes(b"")
    qemu_img("create", "-f", "qed", str(tmp_path / "below.qed"), str(SIZE))
    image = tmp_path / "over.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "below.qed", "-F", "raw", str(image), str(SIZE))
    top = tmp_path / "top.qed"
    qemu_img("create", "-f", "qed", "-b", image.name, "-F", "qcow2", str(top))
    c = open_chains(top, writable=False)
    assert [layer.format_name for layer in c.layers] == ["qed", "qcow2", "raw"]
    assert c.read(0, 4) == b"QED\0"


def qemu_flattened_blocks(image: Path) -> int:
    """Disk space of QEMU's own flattened copy of the chain (`qemu-img convert -O qed`), plus one
    64 KiB cluster: what a streamed top may use, as it holds the same data in the same format
    (the cluster: where the two write their tables, which leaves different 4 KiB holes)."""
    flat = image.with_name("flattened.qed")
    qemu_img("convert", "-O", "qed", str(image), str(flat))
    blocks = flat.stat().st_blocks + 65536 // 512
    flat.unlink()
    return blocks


def test_a_full_stream_gives_qemus_bytes_and_a_clean_sparse_top(tmp_path, open_chains):
    top, _ = qcow2_chain(tmp_path)
    expected = qemu_convert(top, tmp_path / "expected.raw")
    flattened = qemu_flattened_blocks(top)
    c = open_chains(top)
    run_with_streamer(c, stream_to_end)
    assert c.layers == [c.top] and c.read(0, SIZE) == expected
    c.close()
    assert qemu_check(top).returncode == 0
    assert qemu_convert(top, tmp_path / "after.raw") == expected
    assert top.stat().st_blocks <= flattened


def test_a_stream_onto_a_qcow2_base_merges_only_the_layers_above_it(tmp_path, open_chains):
    top, (q3, q2, q1, base) = qcow2_chain(tmp_path)
    expected = qemu_convert(top, tmp_path / "expected.raw")
    c = open_chains(top)
    run_with_streamer(c, stream_to_end, default_base=str(q1))
    assert [layer.path for layer in c.layers] == [str(top), str(q1), str(base)]
    assert c.read(0, SIZE) == expected
    c.close()
    info = json.loads(qemu_img("info", "--output=json", str(top)))
    assert info["backing-filename"] == "q1.qcow2" and "backing-filename-format" not in info  # QED: probed
    assert qemu_check(top).returncode == 0
    assert qemu_convert(top, tmp_path / "after.raw") == expected


def test_a_stream_onto_the_raw_base_below_qcow2_layers(tmp_path, open_chains):
    top, (*_, base) = qcow2_chain(tmp_path)
    expected = qemu_convert(top, tmp_path / "expected.raw")
    c = open_chains(top)
    run_with_streamer(c, stream_to_end, default_base=str(base))
    assert [layer.path for layer in c.layers] == [str(top), str(base)]
    c.close()
    assert qemu_check(top).returncode == 0
    assert qemu_convert(top, tmp_path / "after.raw") == expected


def fusestream(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(FUSESTREAM, *args, check=check, timeout=120)


@pytest.mark.mount
def test_a_mount_streams_a_qcow2_chain(tmp_path, mount):
    top, _ = qcow2_chain(tmp_path)
    expected = qemu_convert(top, tmp_path / "expected.raw")
    flattened = qemu_flattened_blocks(top)
    m = mount(top)
    assert fusestream("wait", str(m.mountpoint)).returncode == 0
    assert m.raw.read_bytes() == expected
    m.umount()
    assert qemu_check(top).returncode == 0
    assert qemu_convert(top, tmp_path / "after.raw") == expected
    assert top.stat().st_blocks <= flattened


@pytest.mark.mount
def test_copy_on_read_from_a_compressed_qcow2_base(tmp_path, mount):
    base = IMAGES["zlib"](tmp_path)
    expected = qemu_convert(base, tmp_path / "expected.raw")
    top = tmp_path / "top.qed"
    fusestream("create", "-b", base.name, str(top))
    m = mount(top, "nostream", "copy_on_read")
    with open(m.raw, "rb") as f:
        f.seek(1 << 20)
        assert f.read(300_000) == expected[1 << 20 : (1 << 20) + 300_000]
    m.umount()
    in_top = [e for e in json.loads(qemu_img("map", "--output=json", str(top))) if e["depth"] == 0 and e["data"]]
    assert in_top and all(e["start"] >= (1 << 20) - 65536 for e in in_top)
    assert qemu_convert(top, tmp_path / "after.raw") == expected


# -- the command line --------------------------------------------------------------------------


def test_create_over_a_qcow2_base_takes_its_size(tmp_path):
    base = IMAGES["zstd"](tmp_path)
    for args in ([], ["-F", "qcow2"]):
        top = tmp_path / "top.qed"
        out = fusestream("create", "-b", base.name, *args, "--force", str(top)).stdout
        assert "backing file zstd.qcow2 (qcow2)" in out
        info = json.loads(qemu_img("info", "--output=json", str(top)))
        assert info["virtual-size"] == SIZE and info["backing-filename"] == "zstd.qcow2"
        assert qemu_convert(top, tmp_path / "t.raw") == qemu_convert(base, tmp_path / "b.raw")


def test_create_with_a_wrong_backing_format_is_refused(tmp_path):
    base = compressible_source(tmp_path / "base.raw")
    result = fusestream("create", "-b", base.name, "-F", "qcow2", str(tmp_path / "top.qed"), check=False)
    assert result.returncode == 1 and "not a qcow2 image" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "top.qed").exists()


def test_info_chain_json_shows_the_qcow2_facts(tmp_path):
    top, _ = qcow2_chain(tmp_path)
    infos = json.loads(fusestream("info", "--chain", "--json", str(top)).stdout)
    assert [i["format"] for i in infos] == ["qed", "qcow2", "qcow2", "qcow2", "raw"]
    q3, q2, q1 = infos[1:4]
    assert q3["format-specific"]["data"] == {"compat": "1.1", "compression-type": "zlib", "extended-l2": True,
                                             "lazy-refcounts": False, "refcount-bits": 16, "corrupt": False}
    assert q2["format-specific"]["data"]["compat"] == "0.10"
    assert q1["cluster-size"] == 65536 and q1["backing-filename-format"] == "raw"
    for ours in (q3, q2, q1):
        theirs = json.loads(qemu_img("info", "--output=json", ours["filename"]))
        assert ours["format-specific"] == theirs["format-specific"]
        assert ours["cluster-size"] == theirs["cluster-size"] and ours["dirty-flag"] == theirs["dirty-flag"]
    text = fusestream("info", "--chain", str(top)).stdout
    assert "compression type: zlib" in text and "compat: 0.10" in text


def test_check_refuses_a_qcow2_image(tmp_path):
    image = IMAGES["zlib"](tmp_path)
    before = hashlib.sha256(image.read_bytes()).digest()
    result = fusestream("check", str(image), check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"fusestream: {image}: a qcow2 image: check works on QED images "
                                     "(use qemu-img check for qcow2)")
    assert hashlib.sha256(image.read_bytes()).digest() == before


# -- refused at open ---------------------------------------------------------------------------


def set_incompatible_bits(image: Path, bits: int) -> None:
    with open(image, "r+b") as f:
        f.seek(72)
        value = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", value | bits))


def encrypted_luks(tmp: Path) -> Path:
    """A LUKS-encrypted image made by qemu-img. Its key derivation benchmark fails on some
    machines whatever the tries ("Unable to get accurate CPU usage": qemu-img 7.2 measures thread
    CPU time, which a VM may not advance), so after five failures the image is a plain one whose
    header says LUKS (crypt_method 2), which is what the refusal reads."""
    image = tmp / "luks.qcow2"
    for _ in range(5):
        made = run("qemu-img", "create", "-f", "qcow2", "--object", "secret,id=sec0,data=123456",
                   "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100", str(image), "1M",
                   check=False)
        if made.returncode == 0:
            return image
    assert "Unable to get accurate CPU usage" in made.stderr, made.stderr
    return with_crypt_method(convert(tmp, "luks.qcow2"), 2)


def encrypted_aes(tmp: Path) -> Path:
    """QEMU no longer creates AES images; the header's crypt_method is what says it."""
    return with_crypt_method(convert(tmp, "aes.qcow2"), 1)


def with_crypt_method(image: Path, method: int) -> Path:
    with open(image, "r+b") as f:
        f.seek(32)
        f.write(struct.pack(">I", method))
    return image


def external_data_file(tmp: Path) -> Path:
    image = tmp / "data-file.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp / 'data.raw'}", str(image), "1M")
    return image


def corrupt_bit(tmp: Path) -> Path:
    image = convert(tmp, "corrupt.qcow2")
    set_incompatible_bits(image, QCOW2_INCOMPAT_CORRUPT)
    return image


def unknown_bit_named(tmp: Path) -> Path:
    """Bit 9 set, and the feature name table's entry for 'corrupt' renamed and moved to bit 9."""
    image = convert(tmp, "unknown-named.qcow2")
    raw = bytearray(image.read_bytes())
    at = raw.index(b"corrupt") - 2
    raw[at : at + 48] = bytes([0, 9]) + b"time travel".ljust(46, b"\0")
    image.write_bytes(bytes(raw))
    set_incompatible_bits(image, 1 << 9)
    return image


def unknown_bit(tmp: Path) -> Path:
    image = convert(tmp, "unknown.qcow2")
    set_incompatible_bits(image, 1 << 40)
    return image


REFUSED = {
    "luks": (encrypted_luks, "qcow2 encryption (LUKS) is not supported"),
    "aes": (encrypted_aes, "qcow2 encryption (AES) is not supported"),
    "data-file": (external_data_file, "qcow2 external data file is not supported"),
    "corrupt": (corrupt_bit, "qcow2 image with the corrupt bit set"),
    "unknown-named": (unknown_bit_named, "qcow2 incompatible feature bit 9 (time travel) is not supported"),
    "unknown": (unknown_bit, "qcow2 incompatible feature bit 40 is not supported"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_what_cannot_be_read_safely_is_refused_with_one_line(tmp_path, name):
    make, message = REFUSED[name]
    image = make(tmp_path)
    before = hashlib.sha256(image.read_bytes()).digest()
    with pytest.raises(UnsupportedImageError) as refused:
        open_layer(str(image))
    assert str(refused.value).startswith(f"{image}: {message}")
    top = tmp_path / "top.qed"
    qemu_img("create", "-f", "qed", "-u", "-b", image.name, "-F", "qcow2", str(top), "1M")
    result = fusestream("info", "--chain", str(top), check=False)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr and str(image) in result.stderr
    assert hashlib.sha256(image.read_bytes()).digest() == before


def test_the_dirty_bit_and_lazy_refcounts_are_read(tmp_path):
    image = convert(tmp_path, "lazy.qcow2", "-o", "lazy_refcounts=on")
    set_incompatible_bits(image, 1)  # QCOW2_INCOMPAT_DIRTY
    layer = Qcow2Image(open_source(str(image)))
    try:
        assert layer.dirty and layer.lazy_refcounts
        assert read_alone(layer, 0, SIZE) == (tmp_path / "source.raw").read_bytes()
    finally:
        layer.close()


def test_internal_snapshots_are_ignored(tmp_path):
    image = convert(tmp_path, "snap.qcow2")
    qemu_img("snapshot", "-c", "before", str(image))
    qemu_io(image, "write -P 0x5a 0 64k", fmt="qcow2")
    expected = qemu_convert(image, tmp_path / "expected.raw")
    layer = Qcow2Image(open_source(str(image)))
    try:
        assert read_alone(layer, 0, SIZE) == expected
    finally:
        layer.close()


# -- impossible tables -------------------------------------------------------------------------


def l2_entry_offset(image: Path, cluster: int) -> int:
    """Where the (standard) L2 entry of a guest cluster lies in the file."""
    raw = image.read_bytes()
    header = QCOW2_HEADER_V2.parse(raw)
    entries = (1 << header.cluster_bits) // 8
    l1_index, l2_index = divmod(cluster, entries)
    l2 = struct.unpack_from(">Q", raw, header.l1_table_offset + 8 * l1_index)[0] & 0x00FFFFFFFFFFFE00
    assert l2, "the cluster's L2 table is not allocated"
    return l2 + 8 * l2_index


def poke(image: Path, offset: int, value: int) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


def test_an_l2_entry_into_metadata_fails_that_range_only(tmp_path):
    image = tmp_path / "data.qcow2"
    qemu_img("create", "-f", "qcow2", str(image), "4M")
    qemu_io(image, "write -P 1 0 128k", fmt="qcow2")
    l1_table_offset = QCOW2_HEADER_V2.parse(image.read_bytes()).l1_table_offset
    for target in (512, l1_table_offset, l2_entry_offset(image, 0) // 65536 * 65536, 1 << 40):
        poke(image, l2_entry_offset(image, 0), target | (1 << 63))
        layer = Qcow2Image(open_source(str(image)))
        try:
            with pytest.raises(CorruptionError, match="data cluster offset"):
                read_alone(layer, 100, 10)
            assert read_alone(layer, 65536, 65536) == b"\1" * 65536
        finally:
            layer.close()


def first_compressed_cluster(image: Path) -> tuple[int, int]:
    """(guest offset, L2 entry's file offset) of the image's first compressed cluster."""
    layer = Qcow2Image(open_source(str(image)))
    try:
        first = next(pos for pos, end, status in our_runs(layer) if status is BlockStatus.FOUND)
    finally:
        layer.close()
    entry_at = l2_entry_offset(image, first // 65536)
    assert struct.unpack(">Q", image.read_bytes()[entry_at : entry_at + 8])[0] & QCOW_OFLAG_COMPRESSED
    return first, entry_at


@pytest.mark.parametrize(("content", "reason"), [
    (b"\xff" * 16, "Invalid deflate block"),  # ISA-L's words for it
    (None, "inflates to 32768 bytes, not one cluster of 65536"),
])
def test_a_compressed_cluster_that_does_not_inflate_to_one_cluster_fails_that_range(tmp_path, content, reason):
    image = convert(tmp_path, "zlib.qcow2", "-c")
    expected = qemu_convert(image, tmp_path / "expected.raw")
    first, entry_at = first_compressed_cluster(image)
    entry = struct.unpack(">Q", image.read_bytes()[entry_at : entry_at + 8])[0]
    coffset, csize = compressed_descriptor(entry, 16)
    inflater = zlib.decompressobj(-12)
    inflater.decompress(image.read_bytes()[coffset : coffset + csize])
    own = csize - len(inflater.unused_data)  # the next cluster's data may follow in the same sector
    deflater = zlib.compressobj(wbits=-12)
    content = content or deflater.compress(b"x" * 32768) + deflater.flush()
    assert len(content) <= own
    with open(image, "r+b") as f:
        f.seek(coffset)
        f.write(content)
    layer = Qcow2Image(open_source(str(image)))
    try:
        with pytest.raises(CorruptionError, match=f"compressed cluster at {coffset}.*{reason}"):
            read_alone(layer, first, 4096)
        after = first // 65536 * 65536 + 65536
        assert read_alone(layer, after, 65536) == expected[after : after + 65536]
    finally:
        layer.close()


def test_a_compressed_descriptor_into_the_header_fails_that_range(tmp_path):
    image = convert(tmp_path, "zlib.qcow2", "-c")
    first, entry_at = first_compressed_cluster(image)
    poke(image, entry_at, QCOW_OFLAG_COMPRESSED | 100)
    layer = Qcow2Image(open_source(str(image)))
    try:
        with pytest.raises(CorruptionError, match="compressed cluster at 100 lies in the header"):
            read_alone(layer, first, 1)
    finally:
        layer.close()


def test_an_l1_entry_into_the_l1_table_is_refused_at_open(tmp_path):
    image = tmp_path / "data.qcow2"
    qemu_img("create", "-f", "qcow2", str(image), "4M")
    qemu_io(image, "write -P 1 0 64k", fmt="qcow2")
    header = QCOW2_HEADER_V2.parse(image.read_bytes())
    poke(image, header.l1_table_offset, header.l1_table_offset | (1 << 63))
    with pytest.raises(InvalidImageError, match="L1 entry 0: L2 table offset .* lies in the L1 table"):
        Qcow2Image(open_source(str(image)))


def test_a_backing_name_at_a_proc_file_is_refused_with_one_line(tmp_path):
    """/proc/self/mem is a 'regular file' that cannot be locked: found by the fuzzer."""
    image = tmp_path / "over.qcow2"
    qemu_img("create", "-f", "qcow2", "-u", "-b", "/proc/self/mem", "-F", "raw", str(image), "1M")
    top = tmp_path / "top.qed"
    qemu_img("create", "-f", "qed", "-u", "-b", image.name, "-F", "qcow2", str(top), "1M")
    result = fusestream("info", "--chain", str(top), check=False)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "/proc/self/mem" in result.stderr
