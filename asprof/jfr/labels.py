"""Request labels and asyncio steps of a recording (issue #15), offline.

Decodes the ``asprof.LabelSet``, ``asprof.SampleLabel`` and ``asprof.Step`` user events
(formats: :mod:`asprof.jfrio.ctxevents`) and joins labels to samples: by ``(thread,
startTime)`` exactly (the built-in engine; async-profiler 4.5+, whose ``sample_counter`` is the
sample's ``startTime``), else by timestamp as :mod:`asprof.jfr.pystacks` does. Label-set ids
are local to a recording file (a source).
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from asprof.jfrio import ctxevents
from asprof.jfrio.ctxevents import Step

if TYPE_CHECKING:  # pragma: no cover
    from asprof.jfr.chunk import Chunk
    from asprof.jfr.chunk import RecordingLike as Recording
    from asprof.jfr.pystacks import PythonStacks

__all__ = ["ContextData", "LabelPairs", "context_of", "parse_where", "Step", "SourceStep"]

log = logging.getLogger("asprof")

LabelPairs = Tuple[Tuple[str, str], ...]
#: How far after the sample's timestamp our record may be for a timestamp join.
TIMESTAMP_WINDOW_NS = 2_000_000


@dataclass
class _Source:
    sets: Dict[int, LabelPairs] = field(default_factory=dict)
    exact: Dict[Tuple[int, int], int] = field(default_factory=dict)
    by_tsc: Dict[int, List[Tuple[int, int]]] = field(default_factory=dict)
    by_mono: Dict[int, List[Tuple[int, int]]] = field(default_factory=dict)
    at_tsc: Dict[Tuple[int, int], int] = field(default_factory=dict)  # (tid, tsc) -> label
    at_mono: Dict[Tuple[int, int], int] = field(default_factory=dict)
    steps: List[Step] = field(default_factory=list)
    records: int = 0
    keyed: bool = False  # records carry exact join keys: a sample without one has no labels
    bad: int = 0


@dataclass(frozen=True)
class SourceStep:
    """A step and the file it came from (the key of its label set)."""

    source: str
    step: Step
    labels: LabelPairs


class ContextData:
    """The labels and steps of a recording."""

    def __init__(self) -> None:
        self._sources: Dict[str, _Source] = {}
        self._rec: Optional["Recording"] = None
        self._stacks: Optional["PythonStacks"] = None  # stacks_of(_rec), once needed

    @classmethod
    def from_recording(cls, rec: "Recording") -> "ContextData":
        self = cls()
        self._rec = rec  # (its Python-stack records: the timestamp join, see lookup)
        for chunk in rec.chunks:
            self._add_chunk(chunk)
        for src in self._sources.values():
            for lst in list(src.by_tsc.values()) + list(src.by_mono.values()):
                lst.sort()
        return self

    def _add_chunk(self, chunk: "Chunk") -> None:
        key = getattr(chunk, "source", "")
        src = self._sources.get(key)
        if src is None:
            src = self._sources[key] = _Source()
        for ev in chunk.events(["profiler.UserEvent"]):
            etype = ev.get("type")
            if etype not in ctxevents.TYPES:
                continue
            data = ev.get("data")
            if not isinstance(data, str):
                continue
            self._decode(src, etype, data)
        if src.bad:
            log.debug("asprof: %d malformed label/step events in %s", src.bad, key)

    @staticmethod
    def _decode(src: _Source, etype: str, data: str) -> None:
        try:
            b = data.encode("latin-1")
            if etype == ctxevents.LABEL_SET:
                src.sets.update(ctxevents.decode_label_sets(b))
            elif etype == ctxevents.SAMPLE_LABEL:
                for r in ctxevents.decode_sample_labels(b):
                    src.records += 1
                    if r.key:
                        src.exact[(r.tid, r.key)] = r.label
                        src.keyed = True
                    if r.tsc:
                        src.by_tsc.setdefault(r.tid, []).append((r.tsc, r.label))
                        src.at_tsc[(r.tid, r.tsc)] = r.label
                    src.by_mono.setdefault(r.tid, []).append((r.mono, r.label))
                    src.at_mono[(r.tid, r.mono)] = r.label
            else:
                src.steps.extend(ctxevents.decode_steps(b))
        except (ValueError, IndexError, UnicodeError):
            src.bad += 1

    @property
    def has_labels(self) -> bool:
        return any(s.records for s in self._sources.values())

    @property
    def has_steps(self) -> bool:
        return any(s.steps for s in self._sources.values())

    def label_keys(self) -> List[str]:
        keys = {k for s in self._sources.values() for pairs in s.sets.values() for k, _v in pairs}
        return sorted(keys)

    def lookup(self, chunk: "Chunk", tid: int, ticks: int, clock: Optional[str] = None) -> Optional[LabelPairs]:
        """The label set of the sample of thread ``tid`` at ``ticks``, or None."""
        src = self._sources.get(getattr(chunk, "source", ""))
        if src is None or not src.records:
            return None
        lab = src.exact.get((tid, ticks))
        if lab is None:
            if src.keyed:
                # Only labelled samples have a record: with exact keys, none means no labels.
                # (A timestamp join would give an unlabelled sample the label of the next
                # labelled one on its thread: event-loop work was counted to the request after.)
                return None
            # The timestamp join (async-profiler 4.0-4.4): the sample's label record, if any,
            # has the timestamp of the Python-stack record it joins (both written from one
            # capture); only without those records, the first label record in the window.
            own = self._joined_time(chunk, tid, ticks, clock)
            if own is not None:
                lab = (src.at_mono if clock == "monotonic" else src.at_tsc).get((tid, own))
                return (src.sets.get(lab, (("asprof.label", f"#{lab}"),)) if lab else None)
            series = (src.by_mono if clock == "monotonic" else src.by_tsc).get(tid)
            if not series:
                return None
            window = TIMESTAMP_WINDOW_NS
            tps = getattr(chunk, "ticks_per_second", None) or getattr(chunk, "frequency", None)
            if clock != "monotonic" and tps:
                window = int(window * tps / 1e9)
            k = bisect.bisect_left(series, (ticks, -1))
            if k < len(series) and 0 <= series[k][0] - ticks <= window:
                lab = series[k][1]
            else:
                return None
        return src.sets.get(lab, (("asprof.label", f"#{lab}"),)) if lab else None

    def _joined_time(self, chunk: "Chunk", tid: int, ticks: int, clock: Optional[str]) -> Optional[int]:
        if self._rec is None:
            return None
        try:
            if self._stacks is None:
                from asprof.jfr.pystacks import stacks_of

                self._stacks = stacks_of(self._rec)
            return self._stacks.joined_time(chunk, tid, ticks, clock)
        except Exception:  # noqa: BLE001 - a recording without readable Python stacks: the window join
            log.debug("asprof: Python stacks unreadable for the label join", exc_info=True)
            return None

    def steps(self) -> List[SourceStep]:
        """Every step of the recording, in time order."""
        out = []
        for key, src in self._sources.items():
            for st in src.steps:
                out.append(SourceStep(key, st, src.sets.get(st.label, ()) if st.label else ()))
        out.sort(key=lambda s: (s.step.start_ns, s.step.tid))
        return out


def context_of(rec: "Recording") -> ContextData:
    """The decoded labels and steps of a recording (decoded once, kept on the recording)."""
    cd = getattr(rec, "_asprof_context", None)
    if cd is None:
        cd = ContextData.from_recording(rec)
        try:
            setattr(rec, "_asprof_context", cd)  # noqa: B010 - not an attribute of RecordingLike
        except AttributeError:  # pragma: no cover
            pass
    return cd


def parse_where(items: Optional[List[str]]) -> Dict[str, str]:
    """``["k=v", ...]`` -> ``{k: v}``; ValueError naming a bad item."""
    out: Dict[str, str] = {}
    for it in items or ():
        k, sep, v = it.partition("=")
        if not sep or not k:
            raise ValueError(f"--where {it!r}: expected LABEL=VALUE")
        out[k] = v
    return out
