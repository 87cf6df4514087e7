"""`fusestream create` and `info`: images made without QEMU open in QEMU as intended."""

from __future__ import annotations

import json

import pytest
from conftest import FUSESTREAM, qemu_check, qemu_img, qemu_io, run

from fusestream.chain import FORMATS
from fusestream.cli import POLL_SECONDS, SUPPORTED_BACKING_FORMATS, WAIT_POLL_MAX, WAIT_POLL_MIN, wait_poll_seconds


def fusestream(*args: str, check: bool = True):
    return run(FUSESTREAM, *args, check=check)


def qemu_info(path) -> dict:
    return json.loads(qemu_img("info", "--output=json", str(path)))


@pytest.mark.parametrize("cluster_size", ["4K", "64K", "1M"])
def test_created_image_without_backing_opens_in_qemu(tmp_path, cluster_size):
    image = tmp_path / "disk.qed"
    fusestream("create", "-s", "3G", "--cluster-size", cluster_size, str(image))
    info = qemu_info(image)
    assert info["format"] == "qed"
    assert info["virtual-size"] == 3 << 30
    assert info["cluster-size"] == {"4K": 4096, "64K": 65536, "1M": 1 << 20}[cluster_size]
    assert "backing-filename" not in info
    qemu_io(image, "write -P 0x5a 1M 64K", "read -P 0x5a 1M 64K")
    assert qemu_check(image).returncode == 0


def test_created_image_over_a_raw_backing_file(tmp_path):
    (tmp_path / "base.raw").write_bytes(b"\x42" * 3 * 65536)
    image = tmp_path / "top.qed"
    fusestream("create", "-b", "base.raw", "-F", "raw", str(image))
    info = qemu_info(image)
    assert info["virtual-size"] == 3 * 65536  # the backing file's size when -s is not given
    assert info["backing-filename"] == "base.raw"
    assert info["backing-filename-format"] == "raw"  # QED_F_BACKING_FORMAT_NO_PROBE
    qemu_io(image, "read -P 0x42 0 192K")


def test_created_image_over_a_qed_backing_file_is_probed(tmp_path):
    qemu_img("create", "-f", "qed", str(tmp_path / "mid.qed"), "10M")
    qemu_io(tmp_path / "mid.qed", "write -P 7 0 4k")
    image = tmp_path / "top.qed"
    fusestream("create", "-b", "mid.qed", "-s", "20M", str(image))
    info = qemu_info(image)
    assert info["virtual-size"] == 20 << 20
    assert info["backing-filename"] == "mid.qed"
    assert "backing-filename-format" not in info  # probed, as QEMU does for QED backing files
    qemu_io(image, "read -P 7 0 4k", "read -P 0 10M 4k")


def test_create_rounds_sizes_up_to_sectors_like_qemu_img(tmp_path):
    ours, theirs = tmp_path / "ours.qed", tmp_path / "theirs.qed"
    fusestream("create", "-s", "1000", str(ours))
    qemu_img("create", "-f", "qed", str(theirs), "1000")
    assert ours.read_bytes() == theirs.read_bytes()


def test_create_refuses_what_it_should(tmp_path):
    image = tmp_path / "disk.qed"
    fusestream("create", "-s", "1M", str(image))
    assert "already exists" in fusestream("create", "-s", "1M", str(image), check=False).stderr
    fusestream("create", "-s", "2M", "--force", str(image))
    assert qemu_info(image)["virtual-size"] == 2 << 20
    for args, message in [
        (["-s", "1M", "--table-size", "1"], "QEMU cannot open"),
        (["-s", "1M", "--cluster-size", "3K"], "invalid cluster_size"),
        (["-s", "ten"], "invalid size"),
        ([], "give a size"),
        (["-b", "missing.raw"], "missing.raw"),
    ]:
        result = fusestream("create", *args, str(tmp_path / "new.qed"), check=False)
        assert result.returncode == 1 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "new.qed").exists()


def test_info_shows_the_chain(tmp_path):
    (tmp_path / "base.raw").write_bytes(bytes(65536))
    fusestream("create", "-b", "base.raw", "-F", "raw", str(tmp_path / "mid.qed"))
    fusestream("create", "-b", "mid.qed", str(tmp_path / "top.qed"))
    layers = json.loads(fusestream("info", "--chain", "--json", str(tmp_path / "top.qed")).stdout)
    assert [layer["format"] for layer in layers] == ["qed", "qed", "raw"]
    assert layers[0]["full-backing-filename"] == str(tmp_path / "mid.qed")
    assert layers[1]["backing-filename-format"] == "raw"
    text = fusestream("info", str(tmp_path / "top.qed")).stdout
    assert "file format: qed" in text and "backing file: mid.qed" in text


def test_create_takes_every_backing_format_the_chain_reads():
    """-F's choices are spelled out for argparse, which runs before any format module is
    imported: they must stay the chain's formats."""
    assert tuple(FORMATS) == SUPPORTED_BACKING_FORMATS


def test_create_never_destroys_an_image_in_use(tmp_path, open_chains):
    (tmp_path / "base.raw").write_bytes(b"\x07" * 65536)
    assert "its own backing file" in fusestream(
        "create", "-b", "base.raw", "--force", str(tmp_path / "base.raw"), check=False).stderr
    assert (tmp_path / "base.raw").read_bytes() == b"\x07" * 65536
    qemu_img("create", "-f", "vmdk", str(tmp_path / "b.vmdk"), "1M")
    assert "unsupported image format 'vmdk'" in fusestream(
        "create", "-b", "b.vmdk", str(tmp_path / "x.qed"), check=False).stderr
    image = tmp_path / "busy.qed"
    fusestream("create", "-s", "1M", str(image))
    chain = open_chains(image)
    result = fusestream("create", "-s", "2M", "--force", str(image), check=False)
    assert result.returncode == 1 and "in use" in result.stderr
    chain.close()
    assert qemu_info(image)["virtual-size"] == 1 << 20


def test_a_zero_sized_image_like_qemu_img(tmp_path):
    fusestream("create", "-s", "0", str(tmp_path / "empty.qed"))
    assert qemu_info(tmp_path / "empty.qed")["virtual-size"] == 0


def test_wait_polls_often_near_the_end_of_a_stream_and_rarely_far_from_it():
    def stream(state="running", offset=0, rate=0):
        return {"state": state, "offset": offset, "len": 1 << 30, "rate": rate}

    assert wait_poll_seconds(stream(offset=(1 << 30) - (1 << 20), rate=1 << 30)) == WAIT_POLL_MIN
    assert wait_poll_seconds(stream(offset=0, rate=1 << 20)) == WAIT_POLL_MAX  # 17 minutes left
    assert wait_poll_seconds(stream(offset=0, rate=1 << 30)) == pytest.approx(0.25)
    assert wait_poll_seconds(stream(rate=0)) == POLL_SECONDS  # the rate is still being measured
    assert wait_poll_seconds(stream(state="paused", rate=1 << 30)) == WAIT_POLL_MAX
