"""Names that become file names.

Dataset names (a plugin registers any string), preset names and the tables' stems built from them
end up in paths under ``--out``.  :func:`safe_stem` keeps a plain name as it is and turns any other
into one that stays inside its folder: no separators, no ``..``, no control characters.
"""

from __future__ import annotations

import hashlib
import re

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
MAX_STEM = 120


def is_plain(name: str) -> bool:
    """Whether ``name`` is usable as a file stem as it is (letters, digits, ``._+-``, not starting
    with ``.`` or ``-``, not too long)."""
    return bool(name) and not _UNSAFE.search(name) and name[0] not in ".-" and len(name) <= MAX_STEM


def safe_stem(name: str) -> str:
    """``name`` where it is plain (:func:`is_plain`); else its unsafe runs replaced by ``_``, cut
    to length, with a short hash of the original so that two names never meet in one file."""
    if is_plain(name):
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    cleaned = _UNSAFE.sub("_", name).lstrip(".-_")[: MAX_STEM - 9]
    return f"{cleaned}-{digest}" if cleaned else digest
