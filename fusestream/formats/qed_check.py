"""The QED consistency check (QEMU's rules, docs/interop/qed_spec.txt "Consistency checking").

Every cluster is referenced at most once; table and data offsets are cluster-aligned, past the
header and inside the file, with room for a whole table. Clusters nothing references are leaks:
wasted space, no harm to data.

Repair only does what needs no guessing: an L1 or L2 entry pointing outside the file (or into
the header) is cleared, since the data it named is not there; leaked clusters at the end of the
file are cut off. A data cluster referenced twice (which qemu-img cannot mend) gets a copy for
every reference after the first: which reference is right cannot be known, but then each guest
offset still reads what it read before, and a write to one no longer changes the other.
"""

from __future__ import annotations

import dataclasses

from .qed import QedImage, open_image
from .qed_structs import QED_F_NEED_CHECK, QED_UNALLOCATED, QED_ZERO_CLUSTER

# qemu-img check's exit status, which `fusestream check` keeps
EXIT_CLEAN, EXIT_CHECK_FAILED, EXIT_CORRUPT, EXIT_LEAKS = 0, 1, 2, 3


@dataclasses.dataclass
class CheckResult:
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    allocated_clusters: int = 0
    total_clusters: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def exit_status(self) -> int:
        if self.corruptions:
            return EXIT_CORRUPT
        return EXIT_LEAKS if self.leaks else EXIT_CLEAN

    def corrupt(self, message: str, fixed: bool) -> None:
        self.problems.append(("Repaired: " if fixed else "ERROR ") + message)
        if fixed:
            self.corruptions_fixed += 1
        else:
            self.corruptions += 1


FREE, METADATA, DATA = 0, 1, 2  # what each cluster of the file is referenced as


class _Checker:
    def __init__(self, image: QedImage, repair: bool):
        self.image = image
        self.repair = repair and image.writable
        self.tables, self.geometry = image.tables, image.geometry
        self.result = CheckResult(total_clusters=-(-image.size // image.cluster_size))
        self.owner = bytearray(image.space.file_size // image.cluster_size)  # FREE, METADATA or DATA
        self._claim(0, self.geometry.first_cluster, METADATA)
        self._claim(self.geometry.l1_table_offset, self.geometry.table_bytes, METADATA)

    def _claim(self, offset: int, length: int, owner: int) -> int:
        """Mark clusters as referenced; returns FREE if they were free (and are now claimed), else
        the owner already there (and nothing is claimed)."""
        cs = self.image.cluster_size
        clusters = range(offset // cs, (offset + length) // cs)
        taken = next((self.owner[c] for c in clusters if self.owner[c]), FREE)
        if taken == FREE:
            for c in clusters:
                self.owner[c] = owner
        return taken

    def run(self) -> CheckResult:
        tables = [(i, offset) for i, offset in enumerate(self.tables.l1) if offset != QED_UNALLOCATED]
        valid = [(i, offset) for i, offset in tables if self._check_table_offset(i, offset)]
        for _, l2_offset in valid:  # all metadata is claimed before any data
            self._check_l2_entries(l2_offset)
        self._count_leaks()
        if self.repair and not self.result.corruptions:
            self.image.mark_clean()
        return self.result

    def _check_table_offset(self, l1_index: int, l2_offset: int) -> bool:
        problem = self.tables.table_offset_problem(l2_offset)
        if problem:
            self.result.corrupt(f"L1 entry {l1_index}: L2 table offset {l2_offset} {problem}", fixed=self.repair)
            if self.repair:
                self.tables.repair_l1_entry(l1_index, QED_UNALLOCATED)
            return False
        if self._claim(l2_offset, self.geometry.table_bytes, METADATA) != FREE:
            self.result.corrupt(f"L1 entry {l1_index}: L2 table at {l2_offset} overlaps other metadata", fixed=False)
            return False
        return True

    def _check_l2_entries(self, l2_offset: int) -> None:
        image = self.image
        cs = image.cluster_size
        cleared = {}
        for index, entry in enumerate(self.tables.read_table(l2_offset, self.geometry.l2_entries)):
            if entry in (QED_UNALLOCATED, QED_ZERO_CLUSTER):
                continue
            where = f"L2 table at {l2_offset}, entry {index}: data cluster offset {entry}"
            if entry % cs or entry + cs > image.space.file_size:
                self.result.corrupt(f"{where} is misaligned or outside the file", fixed=self.repair)
                cleared[index] = QED_UNALLOCATED
                continue
            taken = self._claim(entry, cs, DATA)
            if taken == METADATA:  # the header or a table is certainly not this cluster's data
                self.result.corrupt(f"{where} points into metadata", fixed=self.repair)
                cleared[index] = QED_UNALLOCATED
            elif taken == DATA:  # which reference is right cannot be known: give this one a copy
                self.result.corrupt(f"{where} is referenced more than once", fixed=self.repair)
                if self.repair:
                    cleared[index] = image.alloc.copy_cluster(entry)
                    self.owner.extend(bytes(cleared[index] // cs + 1 - len(self.owner)))
                    self._claim(cleared[index], cs, DATA)
                    self.result.allocated_clusters += 1
            else:
                self.result.allocated_clusters += 1
        if cleared and self.repair:
            self.tables.repair_l2_entries(l2_offset, cleared)

    def _count_leaks(self) -> None:
        cs = self.image.cluster_size
        end = len(self.owner.rstrip(bytes([FREE])))  # the header is always in use
        if self.repair and end < len(self.owner):  # leaks at the end of the file: cut them off
            self.image.alloc.truncate_file(end * cs)
            self.result.leaks_fixed = len(self.owner) - end
            del self.owner[end:]
        self.result.leaks = self.owner.count(FREE)
        c = self.owner.find(FREE)
        for _ in range(min(self.result.leaks, 20)):
            self.result.problems.append(f"Leaked cluster {c} (offset {c * cs})")
            c = self.owner.find(FREE, c + 1)


def check(image: QedImage, repair: bool = False) -> CheckResult:
    """Check an image opened with check_tables=False; with repair (and a writable image), fix what
    can be fixed and, if no corruption remains, clear QED_F_NEED_CHECK."""
    return _Checker(image, repair).run()


def check_file(path: str, repair: bool = False) -> CheckResult:
    """Open an image (exclusively when repairing) and check it."""
    image = open_image(path, writable=repair, check_tables=False)
    try:
        return check(image, repair)
    finally:
        image.close()


def repair_if_needed(path: str) -> CheckResult | None:
    """What QEMU does when it opens an image read-write: if QED_F_NEED_CHECK says it was not
    closed cleanly, check and repair it first. None when no check was needed."""
    image = open_image(path, lock=False, check_tables=False)
    try:
        if not image.header.features & QED_F_NEED_CHECK:
            return None
    finally:
        image.close()
    return check_file(path, repair=True)


def render(result: CheckResult, path: str) -> str:
    """A report in qemu-img check's words."""
    lines = list(result.problems)
    if result.corruptions:
        lines += [f"\n{result.corruptions} errors were found on the image.",
                  "Data may be corrupted, or further writes to the image may corrupt it."]
    if result.leaks:
        lines += [f"\n{result.leaks} leaked clusters were found on the image.",
                  "This means waste of disk space, but no harm to data."]
    if result.corruptions_fixed or result.leaks_fixed:
        lines += ["The following inconsistencies were found and repaired:",
                  f"    {result.leaks_fixed} leaked clusters", f"    {result.corruptions_fixed} corruptions"]
    if not result.corruptions and not result.leaks:
        lines.append("No errors were found on the image.")
    total = max(result.total_clusters, 1)
    lines.append(f"{result.allocated_clusters}/{result.total_clusters} = "
                 f"{100 * result.allocated_clusters / total:.2f}% allocated")
    return "\n".join(lines)

