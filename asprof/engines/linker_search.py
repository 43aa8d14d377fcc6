"""Where the dynamic linker would find a shared library, resolved to absolute paths here.

``dlopen("libasyncProfiler.so")`` lets the linker search, and an empty or relative entry
in ``LD_LIBRARY_PATH`` (``LD_LIBRARY_PATH=:/opt/x``, common in scripts) makes it look in the
current directory: a library planted there would be loaded and its constructors run.
So asprof never hands a bare name to ``dlopen``: :func:`search` lists the files the
linker's own order would consider — the absolute entries of ``LD_LIBRARY_PATH``, then
``/etc/ld.so.cache``, then the system directories — and only those absolute paths are
opened. Empty and relative entries are skipped.
"""
from __future__ import annotations

import os
import struct
import sys
from typing import Iterator, List, Mapping, Optional

__all__ = ["search", "cache_entries"]

_CACHE = "/etc/ld.so.cache"
_NEW_MAGIC = b"glibc-ld.so.cache1.1"
_NEW_HEADER = struct.Struct("<20sII B3x I 12x")  # magic+version, nlibs, len_strings, flags, ext offset
_NEW_ENTRY = struct.Struct("<iIIIQ")  # flags, key, value, osversion, hwcap
_MAX_CACHE_BYTES = 64 << 20


def _system_dirs() -> List[str]:
    dirs = []
    multiarch = getattr(sys.implementation, "_multiarch", None)
    if isinstance(multiarch, str) and multiarch:
        dirs += [f"/lib/{multiarch}", f"/usr/lib/{multiarch}"]
    return dirs + ["/lib64", "/usr/lib64", "/lib", "/usr/lib"]


def _cstring(data: bytes, offset: int) -> Optional[str]:
    if not 0 <= offset < len(data):
        return None
    end = data.find(b"\0", offset)
    if end < 0:
        return None
    return data[offset:end].decode("utf-8", "surrogateescape")


def cache_entries(name: str, path: str = _CACHE) -> List[str]:
    """The paths ``/etc/ld.so.cache`` (glibc's new format) gives for the soname ``name``,
    absolute ones only, in cache order; [] when there is no readable cache."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_CACHE_BYTES)
    except OSError:
        return []
    base = data.find(_NEW_MAGIC)
    if base < 0:
        return []
    try:
        _, nlibs, _, _, _ = _NEW_HEADER.unpack_from(data, base)
    except struct.error:
        return []
    # Every place a C string equal to the name starts (ldconfig shares suffixes: a key may start
    # inside a path); entries are then matched by offset — fast, and this runs at every start
    # that searches.
    needle = name.encode("utf-8", "surrogateescape") + b"\0"
    at = set()
    i = data.find(needle)
    while i >= 0:
        at.add(i - base)
        i = data.find(needle, i + 1)
    if not at:
        return []
    out: List[str] = []
    first = base + _NEW_HEADER.size
    end = min(len(data), first + nlibs * _NEW_ENTRY.size)
    for pos in range(first, end - _NEW_ENTRY.size + 1, _NEW_ENTRY.size):
        _, key, value, _, _ = _NEW_ENTRY.unpack_from(data, pos)
        if key in at:
            target = _cstring(data, base + value)
            if target and os.path.isabs(target) and target not in out:
                out.append(target)
    return out


def search(name: str, environ: Optional[Mapping[str, str]] = None) -> Iterator[str]:
    """Absolute paths of existing files named ``name`` in the linker's search order
    (``LD_LIBRARY_PATH``'s absolute entries, ``/etc/ld.so.cache``, system directories);
    never a path relative to the current directory."""
    env = os.environ if environ is None else environ
    seen = set()
    candidates: List[str] = []
    for entry in env.get("LD_LIBRARY_PATH", "").replace(";", ":").split(":"):
        if os.path.isabs(entry):  # empty and relative entries would mean the working directory
            candidates.append(os.path.join(entry, name))
    candidates += cache_entries(name)
    candidates += [os.path.join(d, name) for d in _system_dirs()]
    for path in candidates:
        path = os.path.normpath(path)
        if path in seen:
            continue
        seen.add(path)
        if os.path.isfile(path):
            yield path
