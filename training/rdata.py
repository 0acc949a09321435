"""A minimal reader for R lazy-load databases (``*.rdb`` / ``*.rdx``), stdlib only.

An R lazy-load database is a pair of files: ``NAME.rdx`` (the index: a gzip-compressed (saveRDS),
serialized named list mapping each object name to ``(offset, length)`` in ``NAME.rdb``) and ``NAME.rdb``
(the concatenated, individually compressed blobs). Each blob is a 4-byte big-endian
uncompressed length followed by a zlib stream (compression type 1; types 2/3 = bzip2/xz carry
an extra type byte after the length). The payload is R's XDR serialization ("X\\n" header).

Only the value types needed for data objects are decoded: NULL, logical/integer/double/
character vectors, generic vectors (lists), pairlists with tags, symbols, references and
attributes. Anything else raises ``ValueError``.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NILVALUE_SXP = 254
REFSXP = 255
SYMSXP, LISTSXP, CHARSXP = 1, 2, 9
LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 10, 13, 14, 16, 19
EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP = 242, 241, 253
R_NA_INT = -(2**31)


@dataclass
class RObject:
    """A decoded R value: ``value`` is a Python list (or None) and ``attributes`` its attributes."""

    rtype: int
    value: Any
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str] | None:
        names = self.attributes.get("names")
        return names.value if isinstance(names, RObject) else None


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated R serialization")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints
            hi, lo = self.int(), self.int()
            n = (hi << 32) + (lo & 0xFFFFFFFF)
        return n

    def header(self) -> None:
        if self._take(2) != b"X\n":
            raise ValueError("not an XDR R serialization (expected 'X\\n')")
        version = self.int()
        self.int()  # writer R version
        self.int()  # minimal reader version
        if version == 3:
            self._take(self.int())  # native encoding name
        elif version != 2:
            raise ValueError(f"unsupported serialization version {version}")

    def item(self) -> Any:
        flags = self.int()
        sxp = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if sxp == NILVALUE_SXP:
            return None
        if sxp in (EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP):
            return RObject(sxp, None)
        if sxp == REFSXP:
            index = flags >> 8
            if index == 0:
                index = self.int()
            return self.refs[index - 1]
        if sxp == SYMSXP:
            name = self.item()
            sym = RObject(SYMSXP, name)
            self.refs.append(sym)
            return sym
        if sxp == CHARSXP:
            n = self.int()
            return None if n == -1 else self._take(n).decode("utf-8", errors="replace")
        if sxp == LISTSXP:  # pairlist: (attr) (tag) car cdr, iterated along the cdr
            items: list[tuple[str | None, Any]] = []
            attrs: dict[str, Any] = {}
            while True:
                if has_attr:
                    attrs.update(self._attr_dict(self.item()))
                tag = self.item() if has_tag else None
                items.append((tag.value if isinstance(tag, RObject) else None, self.item()))
                flags = self.int()
                sxp = flags & 0xFF
                if sxp != LISTSXP:
                    self.pos -= 4
                    tail = self.item()
                    if tail is not None:
                        raise ValueError("improper pairlist")
                    break
                has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
            return RObject(LISTSXP, items, attrs)
        if sxp in (LGLSXP, INTSXP):
            n = self.length()
            vals = list(struct.unpack(f">{n}i", self._take(4 * n)))
            vals = [None if v == R_NA_INT else v for v in vals]
            obj = RObject(sxp, vals)
        elif sxp == REALSXP:
            n = self.length()
            obj = RObject(sxp, list(struct.unpack(f">{n}d", self._take(8 * n))))
        elif sxp == STRSXP:
            n = self.length()
            vals = []
            for _ in range(n):
                cflags = self.int()
                if cflags & 0xFF != CHARSXP:
                    raise ValueError("string vector element is not a CHARSXP")
                m = self.int()
                vals.append(None if m == -1 else self._take(m).decode("utf-8", errors="replace"))
            obj = RObject(sxp, vals)
        elif sxp == VECSXP:
            n = self.length()
            obj = RObject(sxp, [self.item() for _ in range(n)])
        else:
            raise ValueError(f"unsupported R type {sxp} at byte {self.pos - 4}")
        if has_attr:
            obj.attributes = self._attr_dict(self.item())
        return obj

    @staticmethod
    def _attr_dict(pairlist: Any) -> dict[str, Any]:
        if not isinstance(pairlist, RObject) or pairlist.rtype != LISTSXP:
            return {}
        return {tag: val for tag, val in pairlist.value if tag is not None}


def unserialize(data: bytes) -> Any:
    """Decode one XDR-serialized R value."""
    reader = _Reader(data)
    reader.header()
    return reader.item()


def decompress_blob(blob: bytes) -> bytes:
    """Decompress one lazy-load blob (4-byte length, optional type byte, compressed data)."""
    (size,) = struct.unpack(">I", blob[:4])
    body = blob[4:]
    if body[:1] == b"Z":
        out = zlib.decompress(body[1:])
    elif body[:1] == b"2":
        out = bz2.decompress(body[1:])
    elif body[:1] == b"X":
        out = lzma.decompress(body[1:])
    elif body[:1] == b"0":
        out = body[1:]
    else:
        out = zlib.decompress(body)
    if len(out) != size:
        raise ValueError(f"blob decompressed to {len(out)} bytes, header says {size}")
    return out


def read_rds(data: bytes) -> Any:
    """Decode an ``.rds`` payload (``saveRDS``: gzip/bzip2/xz-compressed or plain XDR)."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    elif data[:3] == b"BZh":
        data = bz2.decompress(data)
    elif data[:6] == b"\xfd7zXZ\x00":
        data = lzma.decompress(data)
    return unserialize(data)


def read_lazyload_db(base: str | Path) -> dict[str, Any]:
    """All objects of the lazy-load database ``base`` (path without ``.rdb``/``.rdx``)."""
    base = Path(base)
    raw_index = base.with_suffix(".rdx").read_bytes()
    # The index is written by saveRDS (usually gzip); older databases use the blob format.
    index = read_rds(raw_index) if raw_index[:2] in (b"\x1f\x8b", b"X\n") else unserialize(decompress_blob(raw_index))
    names = index.names or []
    variables = index.value[names.index("variables")]
    blob_data = base.with_suffix(".rdb").read_bytes()
    out: dict[str, Any] = {}
    for name, loc in zip(variables.names or [], variables.value):
        offset, length = (int(v) for v in loc.value)
        out[name] = unserialize(decompress_blob(blob_data[offset : offset + length]))
    return out
