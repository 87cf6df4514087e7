"""Backing chains shaped like the images users have, for the benchmarks (issue 12).

Each shape is built once and cached in bench/.cache/ (built in a scratch directory, renamed into
place when complete), with its oracle ``reference.raw`` from ``qemu-img convert -O raw``. Every
layer is written by QEMU (qemu-io) or, for raw bases, by plain file writes, never by fusestream.

* ``fragmented``: a raw base whose 64 KiB pieces hold random data (75%) or holes (25%) in random
  order (a sparse raw disk a guest has used); ``sn1.qed`` over it with one 50 MiB write; the top
  with one 10 MiB and one 4 KiB write. Today's real-world worst case for lookups.
* ``sparse4k``: a raw base whose data lies in random 4 KiB blocks (a quarter of them), under a
  top with one small write.
* ``deep``: a raw base with data in its first half, and 13 QED layers over it, each with 3% of
  its clusters written at random.
* ``ext4``: ``mkfs.ext4`` on a sparse 2 GiB raw file, a part of /usr copied in through a loop
  mount and a third of the files deleted again; a top with one small write.
* ``terabyte``: a 1 TiB sparse raw base holding 2 GiB of data in random 64 KiB pieces spread over
  the whole disk, under a top with one small write; ``terabyte-twin`` is the same 2 GiB of data
  in a 4 GiB disk, to show that stream time follows the data, not the size of the disk.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from common import CACHE_DIR, CLUSTER, Chain, MiB, qemu_io_commands, run_quiet

SHAPES_LAYOUT = "v1"  # bump when a builder changes what it writes
GiB = 1 << 30
BLOCK = 4096
DEEP_LAYERS = 13
EXT4_SIZE = 2 * GiB
EXT4_COPY_LIMIT = 600 * MiB  # how much of /usr goes into the filesystem image
TERABYTE_DATA = 2 * GiB


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    description: str
    build: Callable[[Path, int], list[Path]]  # (directory, size) -> layers, top first, all written
    size: int | None = None  # a fixed virtual size; None: the benchmark's --size
    # QEMU's peers too. Not on the 1 TiB disks: QEMU's raw driver reports a whole raw file as
    # allocated, so block-stream and qemu-img rebase read every byte of the 1 TiB base (the first
    # block-stream was stopped after 3 minutes, against 3.1 s for fusestream's whole stream).
    qemu_peers: bool = True


def chain_of(shape: Shape, default_size: int, cache_dir: Path = CACHE_DIR) -> Chain:
    """The cached chain of `shape`, built first if needed, as common.Chain: `mid` is the top's
    own backing file (what a relocated copy of the top names), `base` the bottom layer."""
    size = shape.size or default_size
    final = cache_dir / f"shape-{shape.name}-{SHAPES_LAYOUT}-{size}"
    if not (final / "reference.raw").exists():
        scratch = cache_dir / f"{final.name}.building"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        layers = shape.build(scratch, size)
        (scratch / "layers").write_text("\n".join(layer.name for layer in layers) + "\n")
        run_quiet(["qemu-img", "convert", "-O", "raw", str(layers[0]), str(scratch / "reference.raw")])
        shutil.rmtree(final, ignore_errors=True)
        scratch.rename(final)
    names = (final / "layers").read_text().split()
    return Chain(final / names[-1], final / names[1], final / names[0], final / "reference.raw", size)


# -- the builders ----------------------------------------------------------------------------------


def build_fragmented(directory: Path, size: int) -> list[Path]:
    base = directory / "base.raw"
    rng = random.Random(12)
    pieces = list(range(size // CLUSTER))
    rng.shuffle(pieces)
    _write_pieces(base, size, sorted(pieces[: len(pieces) * 3 // 4]), CLUSTER, rng)
    sn1 = _qed_over(directory / "sn1.qed", base, size)
    qemu_io_commands(sn1, [f"write -P 0x51 {_aligned(size // 5)} {min(50 * MiB, size // 4)}"])
    top = _qed_over(directory / "top.qed", sn1, size)
    qemu_io_commands(top, [f"write -P 0x52 {_aligned(size // 2)} {min(10 * MiB, size // 8)}",
                   f"write -P 0x53 {_aligned(size * 3 // 4) + 4096} 4096"])
    return [top, sn1, base]


def build_sparse4k(directory: Path, size: int) -> list[Path]:
    base = directory / "base.raw"
    rng = random.Random(4)
    blocks = size // BLOCK
    _write_pieces(base, size, sorted(rng.sample(range(blocks), blocks // 4)), BLOCK, rng)
    top = _qed_over(directory / "top.qed", base, size)
    qemu_io_commands(top, [f"write -P 0x44 {_aligned(size // 3)} 65536"])
    return [top, base]


def build_deep(directory: Path, size: int) -> list[Path]:
    base = directory / "base.raw"
    rng = random.Random(13)
    _write_pieces(base, size, list(range(size // 2 // MiB)), MiB, rng)
    layers = [base]
    clusters = size // CLUSTER
    for level in range(1, DEEP_LAYERS + 1):
        layer = _qed_over(directory / f"sn{level:02d}.qed", layers[-1], size)
        written = rng.sample(range(clusters), max(1, clusters * 3 // 100))
        qemu_io_commands(layer, [f"write -P {level:#x} {c * CLUSTER} {CLUSTER}" for c in written])
        layers.append(layer)
    return layers[::-1]


def build_ext4(directory: Path, size: int) -> list[Path]:
    base = directory / "base.raw"
    with open(base, "wb") as f:
        f.truncate(size)
    run_quiet(["mkfs.ext4", "-q", "-F", str(base)])
    with tempfile.TemporaryDirectory(prefix="fusestream-shape-") as mnt:
        run_quiet(["mount", "-o", "loop", str(base), mnt])
        try:
            _copy_some_of_usr(Path(mnt) / "usr", EXT4_COPY_LIMIT)
            for i, path in enumerate(sorted(p for p in (Path(mnt) / "usr").rglob("*") if p.is_file())):
                if i % 3 == 0:
                    path.unlink()
        finally:
            run_quiet(["umount", mnt])
    top = _qed_over(directory / "top.qed", base, size)
    qemu_io_commands(top, [f"write -P 0x45 {_aligned(size // 2)} 65536"])
    return [top, base]


def build_half_empty(directory: Path, size: int) -> list[Path]:
    """A raw base with data in a random half of its 1 MiB pieces, under a QED top with 1% of its
    clusters written: a disk half full, as a sparse copy meets it."""
    base = directory / "base.raw"
    rng = random.Random(50)
    pieces = size // MiB
    _write_pieces(base, size, sorted(rng.sample(range(pieces), pieces // 2)), MiB, rng)
    top = _qed_over(directory / "top.qed", base, size)
    written = rng.sample(range(size // CLUSTER), size // CLUSTER // 100)
    qemu_io_commands(top, [f"write -P 0x48 {c * CLUSTER} {CLUSTER}" for c in written])
    return [top, base]


def build_terabyte(directory: Path, size: int) -> list[Path]:
    base = directory / "base.raw"
    rng = random.Random(40)
    pieces = rng.sample(range(size // CLUSTER), TERABYTE_DATA // CLUSTER)
    _write_pieces(base, size, sorted(pieces), CLUSTER, rng)
    top = _qed_over(directory / "top.qed", base, size)
    qemu_io_commands(top, [f"write -P 0x54 {_aligned(size // 2)} 65536"])
    return [top, base]


HALF_EMPTY = Shape("half-empty", "raw base with data in a random half of its 1 MiB pieces; 1% of the top written",
                   build_half_empty)

SHAPES = [
    Shape("fragmented", "raw base, 75% of 64 KiB pieces random, in random order; 50 MiB middle; thin top",
          build_fragmented),
    Shape("sparse4k", "raw base with data in a random quarter of its 4 KiB blocks", build_sparse4k),
    Shape("deep", f"{DEEP_LAYERS} QED layers, 3% of clusters each, over a half-full raw base", build_deep),
    Shape("ext4", f"ext4 of {EXT4_SIZE // GiB} GiB with {EXT4_COPY_LIMIT // MiB} MiB of /usr, a third deleted",
          build_ext4, size=EXT4_SIZE),
    Shape("terabyte", f"1 TiB disk, {TERABYTE_DATA // GiB} GiB of data in random 64 KiB pieces", build_terabyte,
          size=1 << 40, qemu_peers=False),
    Shape("terabyte-twin", f"the same {TERABYTE_DATA // GiB} GiB of data in a 4 GiB disk", build_terabyte,
          size=4 * GiB, qemu_peers=False),
]


# -- helpers ---------------------------------------------------------------------------------------


def _write_pieces(path: Path, size: int, pieces: list[int], piece_size: int, rng: random.Random) -> None:
    """A sparse file of `size` bytes with random data in the given pieces, holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        for piece in pieces:
            f.seek(piece * piece_size)
            f.write(rng.randbytes(piece_size))


def _copy_some_of_usr(dest: Path, limit: int) -> None:
    """Copy regular files of /usr into `dest`, in a fixed order, until `limit` bytes are copied."""
    copied = 0
    for root, dirs, files in os.walk("/usr"):
        dirs.sort()
        for name in sorted(files):
            source = Path(root, name)
            if source.is_symlink() or not source.is_file():
                continue
            target = dest / source.relative_to("/usr")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            copied += source.stat().st_size
            if copied >= limit:
                return


def _qed_over(path: Path, backing: Path, size: int) -> Path:
    fmt = "raw" if backing.suffix == ".raw" else "qed"
    run_quiet(["qemu-img", "create", "-q", "-f", "qed", "-b", backing.name, "-F", fmt, str(path), str(size)])
    return path


def _aligned(offset: int) -> int:
    return offset - offset % CLUSTER
