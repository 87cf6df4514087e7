"""Sizes and rates as users write them: 512, 64K, 10M, 1.5G (binary multiples, as qemu-img)."""

from __future__ import annotations

import re
from fractions import Fraction

_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE | re.ASCII)
# The largest size or rate anyone can mean: a signed 64-bit byte count (qemu-img refuses more,
# and so does the kernel's off_t). Texts longer than this cannot be a valid size at all, so
# they are refused before any arithmetic on their digits.
MAX_SIZE = (1 << 63) - 1
MAX_SIZE_TEXT = 64


def parse_size(text: str) -> int:
    """Bytes for '64K', '1G', '1.5M', '4096', exactly (integer arithmetic, never floats);
    ValueError naming the text otherwise, also for more than MAX_SIZE bytes."""
    if len(text) > MAX_SIZE_TEXT:
        raise ValueError(f"invalid size '{text[:MAX_SIZE_TEXT]}...' (too long to be a size)")
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"invalid size '{text}' (a number with an optional K, M, G, T or P suffix)")
    number, suffix = match.groups()
    value = Fraction(number) * _SUFFIXES[suffix.upper()]
    if value.denominator != 1:
        raise ValueError(f"invalid size '{text}' (not a whole number of bytes)")
    if value > MAX_SIZE:
        raise ValueError(f"invalid size '{text}' (more than {MAX_SIZE} bytes)")
    return int(value)


def format_size(n: float) -> str:
    """A short human size: 512 B, 64 KiB, 1.5 GiB."""
    unit = "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            break
        n, unit = n / 1024, larger
    return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
