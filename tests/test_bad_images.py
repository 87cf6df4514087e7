"""Malformed images are refused at mount: one clear line naming the file, a non-zero exit, the
file unchanged and nothing left mounted."""

from __future__ import annotations

import array
import os
import subprocess

import pytest
from conftest import MOUNT_HELPER, qemu_img, qemu_io, sha256

from fusestream.formats import qed
from fusestream.formats.qed_structs import QED_HEADER, QED_HEADER_SIZE


def make_image(tmp_path):
    """A valid 4 KiB-cluster QED image over a raw base, with one allocated L2 table."""
    (tmp_path / "base.raw").write_bytes(b"\x01" * 65536)
    image = tmp_path / "top.qed"
    qemu_img("create", "-f", "qed", "-o", "cluster_size=4096,table_size=2", "-b", "base.raw", "-F", "raw",
             str(image), "16M")
    qemu_io(image, "write -P 9 0 8k")
    return image


def patch_header(image, **fields):
    raw = image.read_bytes()
    header = QED_HEADER.parse(raw[:QED_HEADER_SIZE])
    header.update(fields)
    image.write_bytes(QED_HEADER.build(header) + raw[QED_HEADER_SIZE:])


def set_l1_entry(image, index: int, value: int):
    header = QED_HEADER.parse(image.read_bytes()[:QED_HEADER_SIZE])
    with open(image, "r+b") as f:
        f.seek(header.l1_table_offset + 8 * index)
        f.write(array.array("Q", [value]).tobytes())


def mount_fails(image, mountpoint, *extra) -> str:
    before = sha256(image) if image.exists() and image.is_file() else None
    result = subprocess.run([MOUNT_HELPER, *extra, str(image), str(mountpoint)], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode != 0
    assert not os.path.ismount(mountpoint)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback
    if before is not None:
        assert sha256(image) == before
    return lines[0]


HEADER_CASES = {
    "cluster_size not a power of two": (dict(cluster_size=12288), "invalid cluster_size 12288"),
    "cluster_size too small": (dict(cluster_size=2048), "invalid cluster_size 2048"),
    "cluster_size too large": (dict(cluster_size=1 << 27), "invalid cluster_size"),
    "table_size zero": (dict(table_size=0), "invalid table_size 0"),
    "table_size not a power of two": (dict(table_size=3), "invalid table_size 3"),
    "table_size too large": (dict(table_size=32), "invalid table_size 32"),
    "image_size not a multiple of 512": (dict(image_size=(16 << 20) + 100), "not a multiple of 512"),
    "image_size beyond the tables": (dict(image_size=8 << 30), "more than the tables can address"),
    "l1_table_offset misaligned": (dict(l1_table_offset=4096 + 512), "invalid l1_table_offset"),
    "l1_table_offset in the header": (dict(l1_table_offset=0), "invalid l1_table_offset"),
    "l1_table_offset beyond the file": (dict(l1_table_offset=1 << 40), "invalid l1_table_offset"),
    "header_size zero": (dict(header_size=0), "invalid header_size"),
    "backing name outside the header": (dict(backing_filename_offset=4090, backing_filename_size=20),
                                        "invalid backing file name"),
    "backing name empty": (dict(backing_filename_size=0), "invalid backing file name"),
    "unknown feature bit": (dict(features=0x01 | 0x04 | 0x40), "unknown QED feature bits 0x40"),
}


@pytest.mark.parametrize("case", HEADER_CASES)
def test_malformed_header_field_is_refused(tmp_path, case):
    fields, message = HEADER_CASES[case]
    image = make_image(tmp_path)
    patch_header(image, **fields)
    (tmp_path / "mnt").mkdir()
    line = mount_fails(image, tmp_path / "mnt")
    assert line.startswith(f"mount.fusestream: {image}: ")
    assert message in line


@pytest.mark.parametrize("value, message", [
    (1 << 40, "beyond the end of the file"),
    (4096 * 3 + 100, "not cluster-aligned"),
    (4096, "overlaps the L1 table"),
])
def test_impossible_l1_entry_is_refused(tmp_path, value, message):
    image = make_image(tmp_path)
    set_l1_entry(image, 1, value)
    (tmp_path / "mnt").mkdir()
    assert message in mount_fails(image, tmp_path / "mnt")


def test_overlapping_l2_tables_are_refused(tmp_path):
    image = make_image(tmp_path)
    first = QED_HEADER.parse(image.read_bytes()[:QED_HEADER_SIZE]).l1_table_offset + 8192
    qemu_io(image, "write -P 3 8M 4k")  # a second L2 table
    set_l1_entry(image, 1, first + 4096)
    (tmp_path / "mnt").mkdir()
    assert "overlap" in mount_fails(image, tmp_path / "mnt")


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (b"QED\0" + bytes(20), "truncated QED header"),
    (b"hello, this is not a disk image\n" * 10, "not a QED image"),
])
def test_non_images_are_refused(tmp_path, content, message):
    image = tmp_path / "top.qed"
    image.write_bytes(content)
    (tmp_path / "mnt").mkdir()
    line = mount_fails(image, tmp_path / "mnt")
    assert message in line and str(image) in line


def test_truncated_image_is_refused(tmp_path):
    image = make_image(tmp_path)
    with open(image, "r+b") as f:
        f.truncate(4096 + 100)  # the header survives, the L1 table does not
    (tmp_path / "mnt").mkdir()
    assert "invalid l1_table_offset" in mount_fails(image, tmp_path / "mnt")


def test_missing_backing_file_is_refused(tmp_path):
    image = make_image(tmp_path)
    (tmp_path / "base.raw").unlink()
    (tmp_path / "mnt").mkdir()
    line = mount_fails(image, tmp_path / "mnt")
    assert f"{tmp_path / 'base.raw'} does not exist" in line


def test_backing_loop_is_refused(tmp_path):
    qed.create(str(tmp_path / "a.qed"), 1 << 20, backing_filename="b.qed")
    qed.create(str(tmp_path / "b.qed"), 1 << 20, backing_filename="a.qed")
    (tmp_path / "mnt").mkdir()
    assert "backing file loop" in mount_fails(tmp_path / "a.qed", tmp_path / "mnt")


def test_missing_image_and_bad_mountpoint_are_one_line_errors(tmp_path):
    (tmp_path / "mnt").mkdir()
    assert "no such file" in mount_fails(tmp_path / "nope.qed", tmp_path / "mnt")
    image = make_image(tmp_path)
    assert "No such file or directory" in mount_fails(image, tmp_path / "missing-dir")
    (tmp_path / "file").write_bytes(b"")
    assert "not a directory" in mount_fails(image, tmp_path / "file")
    line = mount_fails(tmp_path, tmp_path / "mnt")
    assert "not a regular file" in line or "Is a directory" in line


def test_unknown_mount_option_is_an_error(tmp_path):
    image = make_image(tmp_path)
    (tmp_path / "mnt").mkdir()
    assert "unknown mount option 'frobnicate'" in mount_fails(image, tmp_path / "mnt", "-o", "ro,frobnicate")
    assert "speed" in mount_fails(image, tmp_path / "mnt", "-o", "speed=fast")


def test_unknown_autoclear_bits_are_cleared_on_a_read_write_open_only(tmp_path):
    image = make_image(tmp_path)
    patch_header(image, autoclear_features=0x8)
    qed.open_image(str(image), writable=False).close()
    assert QED_HEADER.parse(image.read_bytes()[:QED_HEADER_SIZE]).autoclear_features == 0x8
    qed.open_image(str(image), writable=True).close()
    assert QED_HEADER.parse(image.read_bytes()[:QED_HEADER_SIZE]).autoclear_features == 0


@pytest.mark.mount
def test_backing_dir_and_allow_devices_mount_options(tmp_path, mount):
    image = make_image(tmp_path)
    (tmp_path / "jail").mkdir()
    (tmp_path / "mnt").mkdir()
    line = mount_fails(image, tmp_path / "mnt", "-o", f"backing_dir={tmp_path / 'jail'}")
    assert "is outside backing_dir" in line
    m = mount(image, f"backing_dir={tmp_path}", "allow_devices", "nostream")
    m.umount()
