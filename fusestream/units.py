"""Sizes and rates as users write them: 512, 64K, 10M, 1.5G (binary multiples, as qemu-img)."""

from __future__ import annotations

import re

_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes for '64K', '1G', '1.5M', '4096'; ValueError naming the text otherwise."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"invalid size '{text}' (a number with an optional K, M, G, T or P suffix)")
    number, suffix = match.groups()
    value = float(number) * _SUFFIXES[suffix.upper()]
    if value != int(value):
        raise ValueError(f"invalid size '{text}' (not a whole number of bytes)")
    return int(value)


def format_size(n: float) -> str:
    """A short human size: 512 B, 64 KiB, 1.5 GiB."""
    unit = "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            break
        n, unit = n / 1024, larger
    return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
