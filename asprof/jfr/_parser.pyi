"""Type stubs of the Cython module asprof/jfr/_parser.pyx."""
from array import array
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

KIND_EXEC: int
KIND_WALL: int
KIND_MALLOC: int
KIND_FREE: int
ALL_KINDS: Tuple[int, ...]
SAMPLE_TYPES: Dict[str, int]

class Buf:
    def __init__(self, obj: Any) -> None: ...
    def __len__(self) -> int: ...
    def __getitem__(self, key: slice) -> bytes: ...

Data = Any  # bytes, a Buf, or any object with a contiguous byte buffer

class MetaField:
    name: str
    type_id: Any
    constant_pool: bool
    dimension: int
    annotations: Dict[str, Any]
    kind: int
    type_name: Any

class MetaClass:
    id: Any
    name: str
    super_type: Optional[str]
    simple_type: bool
    fields: List[MetaField]
    annotations: Dict[str, Any]
    scalar: bool
    @property
    def label(self) -> Optional[str]: ...
    @property
    def category(self) -> Any: ...
    def field(self, name: str) -> Optional[MetaField]: ...

class Ref:
    type_id: Any
    key: Any
    def __init__(self, type_id: Any, key: Any) -> None: ...

class StackTable:
    index: Dict[int, int]
    keys: "array[int]"
    starts: "array[int]"
    truncated: "array[int]"
    method: "array[int]"
    line: "array[int]"
    bci: "array[int]"
    ftype: "array[int]"
    def __init__(self) -> None: ...
    def __len__(self) -> int: ...
    def add(self, key: int, truncated: bool, frames: List[Tuple[int, int, int, int]]) -> None: ...
    def frames(self, i: int) -> List[Tuple[int, int, int, int]]: ...

class Columns:
    time: "array[int]"
    thread: "array[int]"
    stack: "array[int]"
    state: "array[int]"
    value: "array[int]"
    kind: "array[int]"
    mem_time: "array[int]"
    mem_address: "array[int]"
    mem_row: "array[int]"
    def __init__(self) -> None: ...
    def __len__(self) -> int: ...

class LeakMap:
    def __init__(self) -> None: ...
    def add_chunk(self, cols: Columns, chunk_id: int, t0: int, t1: int,
                  threads: Optional[Set[int]]) -> Optional[Tuple[int, int]]: ...
    def live(self) -> Dict[int, List[Tuple[int, int]]]: ...

def parse_header(data: Data, offset: int) -> Dict[str, int]: ...
def parse_metadata(data: Data, offset: int, chunk_end: int) -> Tuple[Dict[int, MetaClass], Dict[str, MetaClass]]: ...
def parse_checkpoint(data: Data, offset: int, chunk_end: int, classes: Dict[int, MetaClass],
                     pools: Dict[int, Dict[int, Any]], stacks: StackTable) -> int: ...
def scan_events(data: Data, start: int, end: int, classes: Dict[int, MetaClass], cols: Columns,
                counts: Dict[int, List[int]], checkpoints: List[int],
                progress: Optional[Callable[[int], None]] = ..., progress_step: int = ...,
                kinds: Tuple[int, ...] = ...) -> None: ...
def find_events(data: Data, start: int, end: int, type_ids: Optional[Set[int]]) -> "array[int]": ...
def decode_event(data: Data, offset: int, chunk_end: int, classes: Dict[int, MetaClass],
                 string_type_id: Optional[int]) -> Tuple[int, Dict[str, Any]]: ...
def set_parallel_min_bytes(n: int) -> None: ...
def last_fill_threads() -> int: ...
def select_rows(cols: Columns, kind: int, cpu_states: Optional[Set[int]], t0: int, t1: int,
                threads: Optional[Set[int]]) -> "array[int]": ...
def aggregate(cols: Columns, rows: "array[int]", by_thread: bool, count_only: bool) -> Dict[Any, List[int]]: ...
def aggregate_select(cols: Columns, kind: int, cpu_states: Optional[Set[int]], t0: int, t1: int,
                     threads: Optional[Set[int]], by_thread: bool, count_only: bool) -> Dict[Any, List[int]]: ...
