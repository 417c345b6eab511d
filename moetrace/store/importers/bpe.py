"""Approximate text from byte-level BPE pieces (``Ġ`` = space, ``Ċ`` = newline, ...)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

_SPECIAL = re.compile(r"^(<[|｜].*[|｜]>|</?s>|<unk>|<pad>)$")


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table used by byte-level BPE tokenizers."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def decode_pieces(pieces: Iterable[str]) -> str:
    """Join tokenizer pieces into text; special tokens (``<｜begin▁of▁sentence｜>``) are
    dropped, characters outside the byte table are kept as they are."""
    table = _unicode_to_byte()
    out = bytearray()
    for piece in pieces:
        if _SPECIAL.match(piece):
            continue
        for ch in piece:
            b = table.get(ch)
            if b is None:
                out += ch.encode("utf-8")
            else:
                out.append(b)
    return out.decode("utf-8", errors="replace")
