"""fusestream check [--repair]: QEMU's consistency rules, with qemu-img check as the oracle."""

from __future__ import annotations

import array
import os
import subprocess

import pytest
from conftest import FUSESTREAM, MOUNT_HELPER, qemu_check, qemu_convert, qemu_img, qemu_io, run

from fusestream.formats.qed_structs import QED_F_NEED_CHECK, QED_HEADER, QED_HEADER_SIZE

CS = 4096


def fusestream_check(image, *args) -> subprocess.CompletedProcess:
    return run(FUSESTREAM, "check", *args, str(image), check=False)


@pytest.fixture
def image(tmp_path):
    """4 KiB clusters, data in two L2 tables."""
    path = tmp_path / "t.qed"
    qemu_img("create", "-f", "qed", "-o", "cluster_size=4K,table_size=2", str(path), "64M")
    qemu_io(path, "write -P 1 0 64k", "write -P 2 5M 8k", "write -z 1M 4k")
    return path


def header(path):
    return QED_HEADER.parse(path.read_bytes()[:QED_HEADER_SIZE])


def l2_tables(path) -> list[int]:
    h = header(path)
    raw = path.read_bytes()[h.l1_table_offset : h.l1_table_offset + h.cluster_size * h.table_size]
    return [o for o in array.array("Q", raw) if o]


def set_entry(path, table_offset: int, index: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(table_offset + 8 * index)
        f.write(array.array("Q", [value]).tobytes())


def l2_entry(path, table_offset: int, index: int) -> int:
    with open(path, "rb") as f:
        f.seek(table_offset + 8 * index)
        return array.array("Q", f.read(8))[0]


def test_a_clean_image_is_clean_for_both(image):
    ours = fusestream_check(image)
    assert ours.returncode == qemu_check(image).returncode == 0
    assert "No errors were found on the image." in ours.stdout
    assert "18/16384 = 0.11% allocated" in ours.stdout  # 16 + 2 data clusters; the zero one is not


def test_leaks_at_the_end_are_reported_and_cut_off(image):
    with open(image, "r+b") as f:
        f.truncate(os.path.getsize(image) + 3 * CS)
    assert qemu_check(image).returncode == 3
    ours = fusestream_check(image)
    assert ours.returncode == 3 and "3 leaked clusters were found" in ours.stdout
    before = qemu_convert(image, image.with_suffix(".before"))
    repaired = fusestream_check(image, "--repair")
    assert repaired.returncode == 0 and "3 leaked clusters" in repaired.stdout
    assert qemu_check(image).returncode == 0
    assert qemu_convert(image, image.with_suffix(".after")) == before


def test_an_interior_leak_is_reported_and_left(image):
    first_table = l2_tables(image)[0]
    set_entry(image, first_table, 3, 0)  # the cluster at guest offset 12K is no longer referenced
    assert qemu_check(image).returncode == 3
    assert fusestream_check(image).returncode == 3
    assert fusestream_check(image, "--repair").returncode == 3  # nothing to cut off at the end


def test_an_l2_entry_beyond_the_file_is_corruption_and_is_cleared(image):
    table = l2_tables(image)[0]
    set_entry(image, table, 2, 1 << 40)
    assert qemu_check(image).returncode == 2
    ours = fusestream_check(image)
    assert ours.returncode == 2 and "misaligned or outside the file" in ours.stdout
    repaired = fusestream_check(image, "--repair")
    assert "Repaired:" in repaired.stdout and repaired.returncode == 3  # the orphaned cluster leaks
    assert l2_entry(image, table, 2) == 0
    assert qemu_check(image).returncode == 3


def test_an_l2_entry_pointing_into_the_l1_table_is_cleared(image):
    table = l2_tables(image)[0]
    set_entry(image, table, 4, header(image).l1_table_offset)
    assert fusestream_check(image).returncode == 2
    fusestream_check(image, "--repair")
    assert l2_entry(image, table, 4) == 0
    assert fusestream_check(image).returncode in (0, 3)


def test_a_cluster_referenced_twice_gets_a_copy_for_the_second_reference(image):
    table = l2_tables(image)[0]
    set_entry(image, table, 5, l2_entry(image, table, 6))
    before = qemu_convert(image, image.with_suffix(".before"))
    assert qemu_check(image).returncode == 2
    assert fusestream_check(image).returncode == 2
    assert run("qemu-img", "check", "-r", "all", str(image), check=False).returncode == 2  # QEMU cannot
    repaired = fusestream_check(image, "--repair")
    assert repaired.returncode == 3, repaired.stdout  # the cluster entry 5 named before the damage leaks
    assert "Repaired: L2 table" in repaired.stdout and "referenced more than once" in repaired.stdout
    assert l2_entry(image, table, 5) != l2_entry(image, table, 6)
    assert qemu_check(image).returncode == 3
    assert qemu_convert(image, image.with_suffix(".after")) == before  # every offset reads as before
    qemu_io(image, "write -P 9 20k 4k")  # guest offset 20K (entry 5) now has a cluster of its own
    after = qemu_convert(image, image.with_suffix(".written"))
    assert after[24 << 10 : 28 << 10] == before[24 << 10 : 28 << 10]


def test_an_l1_entry_beyond_the_file_is_cleared(image):
    h = header(image)
    set_entry(image, h.l1_table_offset, 7, 1 << 40)
    assert fusestream_check(image).returncode == 2
    fusestream_check(image, "--repair")
    assert l2_entry(image, h.l1_table_offset, 7) == 0
    assert qemu_check(image).returncode == 0


def test_the_check_itself_failing_is_exit_1(tmp_path):
    (tmp_path / "x.qed").write_bytes(b"not an image")
    result = fusestream_check(tmp_path / "x.qed")
    assert result.returncode == 1 and "not a QED image" in result.stderr


def set_need_check(path) -> None:
    h = header(path)
    h.features |= QED_F_NEED_CHECK
    with open(path, "r+b") as f:
        f.write(QED_HEADER.build(h))


@pytest.mark.mount
def test_a_read_write_mount_checks_and_repairs_a_dirty_image_first(image, mount):
    with open(image, "r+b") as f:
        f.truncate(os.path.getsize(image) + 2 * CS)
    set_need_check(image)
    m = mount(image)
    assert not header(image).features & QED_F_NEED_CHECK
    stderr = m.umount()
    assert "was not closed cleanly: check repaired 0 corruptions and 2 leaked clusters" in stderr
    assert qemu_check(image).returncode == 0


@pytest.mark.mount
def test_a_dirty_image_that_stays_corrupt_is_not_mounted(image, tmp_path):
    first, second = l2_tables(image)
    set_entry(image, header(image).l1_table_offset, 1, first)  # two L1 entries, one L2 table
    set_need_check(image)
    (tmp_path / "mnt").mkdir()
    for options, reason in (([], "1 corruptions remain after repair"), (["-o", "ro"], "overlap")):
        result = subprocess.run([MOUNT_HELPER, *options, str(image), str(tmp_path / "mnt")],
                                capture_output=True, text=True)
        errors = [line for line in result.stderr.splitlines() if line.startswith("mount.fusestream:")]
        assert result.returncode == 1 and len(errors) == 1 and reason in errors[0], result.stderr
        assert not os.path.ismount(tmp_path / "mnt")
    assert header(image).features & QED_F_NEED_CHECK
