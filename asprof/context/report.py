"""What an engine adds to each report for labels and asyncio steps (issue #15).

:class:`ContextEvents` is shared by both engines: the built-in engine writes its payloads with
:mod:`asprof.jfrio.writer` (:meth:`write_sample_labels`, :meth:`write_report_end`), the
async-profiler engine hands them to ``asprof._pyframes.emit_context`` before each rotation
(:meth:`payloads_for_rotation`). Payload formats: :mod:`asprof.jfrio.ctxevents`.
"""
from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING, Any, Iterable, List, Optional, Sequence, Set, Tuple

from asprof.context import registry
from asprof.context import steps as _steps
from asprof.jfrio import ctxevents

if TYPE_CHECKING:
    from asprof.jfrio.writer import ChunkWriter

__all__ = ["ContextEvents", "USER_EVENT_KEYS"]

log = logging.getLogger("asprof")

#: UserEventType pool keys the built-in engine uses for the three types.
USER_EVENT_KEYS = {ctxevents.LABEL_SET: 15001, ctxevents.SAMPLE_LABEL: 15002, ctxevents.STEP: 15003}
_SAMPLE = struct.Struct("<QIIBBH")  # asprof.jfrio.writer.SAMPLE: time, tid, stack, kind, state, label index
OVERFLOW_INDEX = 0xFFFF


class ContextEvents:
    """Labels and steps of one engine's reports. ``steps``: hook the asyncio event loop
    (``ProfilerOptions.asyncio_steps``); ``threshold_ns``: steps at least this long are recorded
    even without a sample taken during them (the wall interval)."""

    def __init__(self, steps: bool, threshold_ns: int, otel: bool = False) -> None:
        self.otel = otel
        self.steps_wanted = steps
        self.threshold_ns = threshold_ns
        self._used: Set[int] = set()
        self.steps_written = 0
        self.labelled_samples = 0

    def start(self) -> None:
        if self.otel:
            from asprof.context import enable_otel

            enable_otel(True)
        if self.steps_wanted:
            try:
                _steps.install(self.threshold_ns)
            except Exception:  # noqa: BLE001 - never stop profiling for it
                log.warning("asprof: could not hook the asyncio event loop", exc_info=True)
        else:  # no step events: the hook that keeps labels right across task switches, if labels are used
            import asprof.context as _c

            threshold = self.threshold_ns
            _c.set_on_first_use(lambda: (_steps.install(threshold, record=False), None)[1])

    def stop(self) -> None:
        import asprof.context as _c

        _c.set_on_first_use(None)
        if self.otel:
            from asprof.context import enable_otel

            enable_otel(False)
        _steps.uninstall()

    # -- the built-in engine ---------------------------------------------------------------

    def write_sample_labels(self, w: "ChunkWriter", samples: bytes, label_ids: Sequence[int],
                            skip_tids: Iterable[int] = ()) -> int:
        """``asprof.SampleLabel`` records for the batch's labelled samples (their reserved field
        is an index + 1 into ``label_ids``). Returns how many."""
        if not label_ids:
            return 0
        skip = set(skip_tids)
        recs: List[Tuple[int, int, int, int, int]] = []
        n = len(label_ids)
        for t, tid, _sid, _kind, _state, idx in _SAMPLE.iter_unpack(samples):
            if idx == 0 or tid in skip:
                continue
            lab = label_ids[idx - 1] if idx <= n else registry.overflow
            recs.append((tid, t, 0, t, int(lab)))
            self._used.add(int(lab))
        for p in ctxevents.encode_sample_labels(recs):
            _user_event(w, ctxevents.SAMPLE_LABEL, p)
        self.labelled_samples += len(recs)
        return len(recs)

    def write_report_end(self, w: "ChunkWriter") -> None:
        """The definitions of the label sets the report used, and the steps recorded since the
        previous report."""
        for p in self._label_payloads(self._used):
            _user_event(w, ctxevents.LABEL_SET, p)
        self._used = set()
        for p in self._step_payloads():
            _user_event(w, ctxevents.STEP, p)
        registry.rotate()

    # -- async-profiler --------------------------------------------------------------------

    def payloads_for_rotation(self, seen: Iterable[int]) -> List[Tuple[int, bytes]]:
        """(kind, payload) to emit before a rotation: kind 0 ``asprof.LabelSet`` for the ids
        ``seen`` in samples and the recently used ones, kind 1 ``asprof.Step``."""
        ids = set(seen)
        ids.update(registry.recent())
        out = [(0, p) for p in self._label_payloads(ids)]
        out += [(1, p) for p in self._step_payloads()]
        registry.rotate()
        return out

    # -- shared ----------------------------------------------------------------------------

    def _label_payloads(self, ids: Iterable[int]) -> List[bytes]:
        return ctxevents.encode_label_sets(registry.resolve(sorted(i for i in ids if i)))

    def _step_payloads(self) -> List[bytes]:
        if not _steps.installed() and not self.steps_wanted:
            return []
        recs, _dropped = _steps.drain()
        if not recs:
            return []
        self.steps_written += len(recs)
        return ctxevents.encode_steps(_steps.clock_offset(), recs)


def _user_event(w: "ChunkWriter", name: str, payload: bytes) -> None:
    key = USER_EVENT_KEYS[name]
    w.user_event_type(key, name)
    w.event("profiler.UserEvent", w.start_ticks, 0, key, payload.decode("latin-1"))


def label_ids_of(mod: Any) -> List[int]:
    """The label-set ids of the built-in module's last collect() (empty when it has none)."""
    f: Optional[Any] = getattr(mod, "batch_labels", None)
    try:
        return list(f()) if f is not None else []
    except Exception:  # noqa: BLE001
        return []
