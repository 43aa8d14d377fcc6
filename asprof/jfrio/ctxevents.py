"""Request labels and asyncio step events in JFR (issue #15): the payloads, both ways.

Both engines write them as ``profiler.UserEvent`` events (async-profiler through
``asprof_emit_jfr_event``, the built-in engine through :mod:`asprof.jfrio.writer`), whose
``data`` is a Latin-1 string of these bytes (varints are LEB128, strings a varint length +
UTF-8), at most :data:`MAX_PAYLOAD` bytes per event:

===================== ================================================================
type                  data
===================== ================================================================
``asprof.LabelSet``   version 1, then per label set: id, pair count, (key, value) pairs
``asprof.SampleLabel`` version 1, then per labelled sample: tid, join key (the sample's
                      ``startTime`` ticks, or async-profiler's ``sample_counter``; 0 =
                      none), CPU ticks (0 = none), CLOCK_MONOTONIC ns, label-set id
``asprof.Step``       version 1, the offset ``epoch ns - CLOCK_MONOTONIC ns`` of the
                      process, then per event-loop step: tid, start (CLOCK_MONOTONIC ns),
                      duration ns, samples counted during it, label-set id (0 = none),
                      name (the task's name and coroutine, or the callback)
===================== ================================================================

Samples without labels have no ``asprof.SampleLabel`` record. Label-set ids are local to a
recording file: each file defines the ones its records use.
"""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, NamedTuple, Sequence, Tuple

from asprof.jfrio.decode import leb_string, uleb128

__all__ = [
    "LABEL_SET", "SAMPLE_LABEL", "STEP", "MAX_PAYLOAD", "VERSION", "Step", "SampleLabel",
    "encode_label_sets", "encode_sample_labels", "encode_steps", "decode_label_sets",
    "decode_sample_labels", "decode_steps",
]

LABEL_SET = "asprof.LabelSet"
SAMPLE_LABEL = "asprof.SampleLabel"
STEP = "asprof.Step"
TYPES = (LABEL_SET, SAMPLE_LABEL, STEP)
VERSION = 1
#: async-profiler's limit for one user event (ASPROF_MAX_JFR_EVENT_LENGTH).
MAX_PAYLOAD = 2048
#: Bytes of a key or a value kept (UTF-8, cut at a character boundary).
MAX_TEXT = 200


class SampleLabel(NamedTuple):
    tid: int
    key: int
    tsc: int
    mono: int
    label: int


class Step(NamedTuple):
    """One event-loop step: ``start_ns`` in ns since the epoch, ``duration_ns``."""

    tid: int
    start_ns: int
    duration_ns: int
    samples: int
    label: int
    name: str

    @property
    def end_ns(self) -> int:
        return self.start_ns + self.duration_ns


def _varint(v: int) -> bytes:
    v &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while True:
        c = v & 0x7F
        v >>= 7
        if v:
            out.append(c | 0x80)
        else:
            out.append(c)
            return bytes(out)


def _text(s: str) -> bytes:
    b = s.encode("utf-8", "replace")
    if len(b) > MAX_TEXT:
        b = b[:MAX_TEXT].decode("utf-8", "ignore").encode("utf-8")
    return _varint(len(b)) + b


def _pack(items: Iterable[bytes], head: bytes) -> Iterator[bytes]:
    """Items into payloads of at most MAX_PAYLOAD bytes, each starting with ``head``."""
    cur = bytearray(head)
    for it in items:
        if len(head) + len(it) > MAX_PAYLOAD:
            continue  # cannot happen: items are bounded (texts are cut)
        if len(cur) + len(it) > MAX_PAYLOAD:
            yield bytes(cur)
            cur = bytearray(head)
        cur += it
    if len(cur) > len(head):
        yield bytes(cur)


def encode_label_sets(sets: Iterable[Tuple[int, Sequence[Tuple[str, str]]]]) -> List[bytes]:
    """Payloads of ``asprof.LabelSet`` events for (id, pairs)."""
    items = []
    for sid, pairs in sets:
        b = bytearray(_varint(sid))
        b += _varint(len(pairs))
        for k, v in pairs:
            b += _text(k)
            b += _text(v)
        items.append(bytes(b))
    return list(_pack(items, bytes((VERSION,))))


def encode_sample_labels(records: Iterable[Tuple[int, int, int, int, int]]) -> List[bytes]:
    """Payloads of ``asprof.SampleLabel`` events for (tid, key, tsc, mono, label) records."""
    return list(_pack((_varint(t) + _varint(k) + _varint(c) + _varint(m) + _varint(lab)
                       for t, k, c, m, lab in records), bytes((VERSION,))))


def encode_steps(offset_ns: int, steps: Iterable[Tuple[int, int, int, int, int, str]]) -> List[bytes]:
    """Payloads of ``asprof.Step`` events: ``offset_ns`` = epoch ns - monotonic ns; steps as
    (tid, start mono ns, end mono ns, samples, label, name)."""
    head = bytes((VERSION,)) + _varint(max(0, offset_ns))
    return list(_pack((_varint(t) + _varint(s) + _varint(max(0, e - s)) + _varint(n) + _varint(lab) + _text(name)
                       for t, s, e, n, lab, name in steps), head))


def _check(b: bytes) -> int:
    if not b or b[0] != VERSION:
        raise ValueError(f"unknown payload version {b[0] if b else None}")
    return 1


def decode_label_sets(b: bytes) -> Dict[int, Tuple[Tuple[str, str], ...]]:
    i, n = _check(b), len(b)
    out: Dict[int, Tuple[Tuple[str, str], ...]] = {}
    while i < n:
        sid, i = uleb128(b, i)
        count, i = uleb128(b, i)
        if count > 256:
            raise ValueError("label set with more than 256 labels")
        pairs = []
        for _ in range(count):
            k, i = leb_string(b, i)
            v, i = leb_string(b, i)
            pairs.append((k, v))
        out[sid] = tuple(pairs)
    return out


def decode_sample_labels(b: bytes) -> List[SampleLabel]:
    i, n = _check(b), len(b)
    out = []
    while i < n:
        tid, i = uleb128(b, i)
        key, i = uleb128(b, i)
        tsc, i = uleb128(b, i)
        mono, i = uleb128(b, i)
        lab, i = uleb128(b, i)
        out.append(SampleLabel(tid, key, tsc, mono, lab))
    return out


def decode_steps(b: bytes) -> List[Step]:
    """Steps with their start in ns since the epoch."""
    i, n = _check(b), len(b)
    offset, i = uleb128(b, i)
    out = []
    while i < n:
        tid, i = uleb128(b, i)
        start, i = uleb128(b, i)
        dur, i = uleb128(b, i)
        samples, i = uleb128(b, i)
        lab, i = uleb128(b, i)
        name, i = leb_string(b, i)
        out.append(Step(tid, start + offset, dur, samples, lab, name))
    return out
