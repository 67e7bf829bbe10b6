"""The protocol's events: frozen, slotted dataclasses that validate themselves on construction.

An invalid event raises LocalProtocolError naming the event, the field and the bound. The same
classes come out of `Connection.next_event`, where a failed check becomes RemoteProtocolError.
Checks that need the conversation (the memory layout, the negotiated batch size, the MAC) live in
connection.py; everything a single event can tell about itself is checked here.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from . import limits
from .errors import LocalProtocolError

AuthMode = Literal["psk", "none", "tls"]
AUTH_MODES: frozenset[str] = frozenset({"psk", "none", "tls"})
VERIFY_MODES: frozenset[str] = frozenset({"full", "off"})
QUERY_STATES: frozenset[str] = frozenset({"running", "aborted", "unknown"})
ARCHES: frozenset[str] = frozenset({"x86_64", "aarch64"})
DIRTY_TRACKING_MODES: frozenset[str] = frozenset({"ring", "ring+bitmap", "bitmap"})
"""ring (KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]), ring with the backup bitmap (DESIGN R2), bitmap only."""

Buffer = bytes | bytearray | memoryview | npt.NDArray[Any]
PageIndices = npt.NDArray[np.uint64]
Features = dict[str, Any] | tuple[Any, ...]


class Event:
    """Base of every event; `next_event` returns these (or NEED_DATA)."""

    __slots__ = ()


# --- validation helpers -------------------------------------------------------------------------


def _fail(owner: object, name: str, problem: str) -> LocalProtocolError:
    return LocalProtocolError(f"{type(owner).__name__}.{name} {problem}")


def _int(owner: object, name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise _fail(owner, name, f"must be an integer, got {type(value).__name__}")
    number = operator.index(value)
    if not low <= number <= high:
        raise _fail(owner, name, f"must be in [{low}, {high}], got {number}")
    return number


def _int_field(owner: object, name: str, low: int, high: int) -> int:
    """Check owner.name and store it back as a plain int (numpy integers do not pack)."""
    number = _int(owner, name, getattr(owner, name), low, high)
    _set(owner, name, number)
    return number


def _str(owner: object, name: str, value: object, max_chars: int) -> str:
    if not isinstance(value, str):
        raise _fail(owner, name, f"must be a str, got {type(value).__name__}")
    if len(value) > max_chars:
        raise _fail(owner, name, f"is {len(value)} characters, more than {max_chars}")
    if not value:
        raise _fail(owner, name, "must not be empty")
    # Printable only: these strings end up in logs and operator output.
    if not value.isprintable():
        raise _fail(owner, name, f"holds control characters: {value[:80]!r}")
    return value


def _choice(owner: object, name: str, value: object, choices: frozenset[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _fail(owner, name, f"must be one of {sorted(choices)}, got {repr(value)[:80]}")
    return value


def _bytes(owner: object, name: str, value: object, low: int, high: int) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise _fail(owner, name, f"must be bytes, got {type(value).__name__}")
    data = bytes(value)
    if not low <= len(data) <= high:
        want = f"{low}" if low == high else f"{low} to {high}"
        raise _fail(owner, name, f"must be {want} bytes, got {len(data)} bytes")
    return data


def _digest(owner: object, name: str, value: object) -> bytes | None:
    if value is None:
        return None
    return _bytes(owner, name, value, 1, limits.MAX_DIGEST_BYTES)


def as_view(buffer: object) -> memoryview:
    """A memoryview of any buffer (numpy arrays included, which typeshed does not know)."""
    return memoryview(buffer)  # type: ignore[arg-type]


def _set(owner: object, name: str, value: object) -> None:
    object.__setattr__(owner, name, value)


# --- handshake ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello(Event):
    """Both ways, source first. Make yours with `Connection.make_hello()`."""

    version_min: int
    version_max: int
    node: str
    nonce: bytes
    auth: AuthMode
    capabilities: frozenset[str]
    max_batch_bytes: int

    def __post_init__(self) -> None:
        low = _int_field(self, "version_min", 1, limits.VERSION_LIMIT)
        _int_field(self, "version_max", low, limits.VERSION_LIMIT)
        _str(self, "node", self.node, limits.MAX_NAME_CHARS)
        nonce = limits.NONCE_BYTES
        _set(self, "nonce", _bytes(self, "nonce", self.nonce, nonce, nonce))
        _choice(self, "auth", self.auth, AUTH_MODES)
        caps = self.capabilities
        if isinstance(caps, (str, bytes)) or not isinstance(caps, Iterable):
            raise _fail(self, "capabilities", f"must be a set of str, got {type(caps).__name__}")
        items = list(caps)
        if len(items) > limits.MAX_CAPABILITIES:
            raise _fail(self, "capabilities", f"has {len(items)} entries, more than {limits.MAX_CAPABILITIES}")
        for cap in items:
            _str(self, "capabilities", cap, limits.MAX_SHORT_STR_CHARS)
        _set(self, "capabilities", frozenset(items))
        _int_field(self, "max_batch_bytes", limits.MIN_MAX_BATCH_BYTES, limits.HARD_MAX_PAYLOAD_BYTES)


@dataclass(frozen=True, slots=True)
class Auth(Event):
    """Both ways after HELLO when auth is "psk", source first. Make yours with `make_auth()`."""

    mac: bytes

    def __post_init__(self) -> None:
        size = limits.MAC_BYTES
        _set(self, "mac", _bytes(self, "mac", self.mac, size, size))


# --- setup --------------------------------------------------------------------------------------


class MemoryRegion(NamedTuple):
    """One KVM memslot: its id, where it sits in guest physical memory, and its size in bytes."""

    slot: int
    guest_phys_addr: int
    size: int


def _freeze_feature(owner: object, value: object, depth: int) -> object:
    """cpu_features as msgpack gives it back: lists become tuples, so a sent and a received
    description compare equal; only msgpack's plain types are allowed."""
    if depth > limits.MAX_FEATURE_DEPTH:
        raise _fail(owner, "cpu_features", f"nests deeper than {limits.MAX_FEATURE_DEPTH}")
    if value is None or isinstance(value, (bool, str, bytes)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _fail(owner, "cpu_features", f"holds a non-finite float {value!r}")
        return value
    if isinstance(value, int):
        return _int(owner, "cpu_features", value, limits.I64_MIN, limits.U64_MAX)
    if isinstance(value, (list, tuple)):
        return tuple(_freeze_feature(owner, item, depth + 1) for item in value)
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _fail(owner, "cpu_features", f"has a non-str key {key!r}")
            out[key] = _freeze_feature(owner, item, depth + 1)
        return out
    raise _fail(owner, "cpu_features", f"holds a {type(value).__name__}, not a msgpack type")


def _x86_features(owner: object, features: Mapping[str, object]) -> None:
    """The x86 machine facts cpu_features may carry, bounded here like every wire field (an older
    peer leaves them out, and an older target ignores them)."""
    cpuid = features.get("vcpu_cpuid")
    if cpuid is not None:
        name = "cpu_features.vcpu_cpuid"
        if not isinstance(cpuid, tuple) or not 1 <= len(cpuid) <= limits.MAX_CPUID_ENTRIES:
            raise _fail(owner, name, f"must be 1 to {limits.MAX_CPUID_ENTRIES} CPUID entries")
        size = limits.CPUID_ENTRY_BYTES
        for i, entry in enumerate(cpuid):
            if not isinstance(entry, bytes) or len(entry) != size:
                raise _fail(owner, f"{name}[{i}]", f"must be {size} bytes (struct kvm_cpuid_entry2)")
        # Each entry starts with its u32 function and u32 index: a leaf given twice is ambiguous.
        if len({entry[:8] for entry in cpuid}) != len(cpuid):
            raise _fail(owner, name, "gives the same (function, index) twice")
    msrs = features.get("msr_indices")
    if msrs is not None:
        name = "cpu_features.msr_indices"
        if not isinstance(msrs, tuple) or len(msrs) > limits.MAX_MSR_INDICES:
            raise _fail(owner, name, f"must be at most {limits.MAX_MSR_INDICES} MSR indices")
        for i, index in enumerate(msrs):
            _int(owner, f"{name}[{i}]", index, 0, limits.U32_MAX)
        if len(set(msrs)) != len(msrs):
            raise _fail(owner, name, "names an MSR twice")
    xsave = features.get("xsave_bytes")
    if xsave is not None:
        _int(owner, "cpu_features.xsave_bytes", xsave, limits.MIN_XSAVE_BYTES, limits.MAX_XSAVE_BYTES)


def _regions(owner: object, value: object, page_size: int) -> tuple[MemoryRegion, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise _fail(owner, "memory", f"must be a sequence of (slot, gpa, size), got {type(value).__name__}")
    items = list(value)
    if not 1 <= len(items) <= limits.MAX_MEMORY_REGIONS:
        raise _fail(owner, "memory", f"must hold 1 to {limits.MAX_MEMORY_REGIONS} regions, got {len(items)}")
    regions: list[MemoryRegion] = []
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise _fail(owner, "memory", f"entries must be (slot, gpa, size), got {item!r}")
        slot = _int(owner, "memory slot", item[0], 0, limits.U32_MAX)
        gpa = _int(owner, f"memory[slot {slot}].guest_phys_addr", item[1], 0, limits.GUEST_PHYS_LIMIT - page_size)
        size = _int(owner, f"memory[slot {slot}].size", item[2], page_size, limits.GUEST_PHYS_LIMIT - gpa)
        if gpa % page_size or size % page_size:
            raise _fail(
                owner,
                f"memory[slot {slot}]",
                f"gpa {gpa:#x} and size {size:#x} must be multiples of the page size {page_size}",
            )
        regions.append(MemoryRegion(slot, gpa, size))
    slots = [region.slot for region in regions]
    if len(set(slots)) != len(slots):
        raise _fail(owner, "memory", f"names a slot twice: {sorted(slots)}")
    by_address = sorted(regions, key=lambda region: region.guest_phys_addr)
    for low, high in zip(by_address, by_address[1:]):
        if low.guest_phys_addr + low.size > high.guest_phys_addr:
            raise _fail(owner, "memory", f"slots {low.slot} and {high.slot} overlap")
    return tuple(regions)


@dataclass(frozen=True, slots=True)
class VmDescription(Event):
    """Source -> target: what the VM needs. The target answers Accept or Abort."""

    name: str
    migration_id: str
    memory: tuple[MemoryRegion, ...]
    vcpus: int
    guest_kind: str
    cpu_features: Features = field(hash=False)
    dirty_tracking: str
    page_size: int = 4096
    arch: str = "x86_64"
    verify: Literal["full", "off"] | None = None
    """The verify mode the source will name in Done, said ahead so that the target can digest its
    RAM as soon as every page is in rather than after Done (optional: older sources do not
    send it). Done's is the one that counts."""

    def __post_init__(self) -> None:
        _str(self, "name", self.name, limits.MAX_NAME_CHARS)
        _str(self, "migration_id", self.migration_id, limits.MAX_NAME_CHARS)
        page_size = _int_field(self, "page_size", 1, limits.U32_MAX)
        if page_size not in limits.PAGE_SIZES:
            raise _fail(self, "page_size", f"must be one of {sorted(limits.PAGE_SIZES)}, got {page_size}")
        _set(self, "memory", _regions(self, self.memory, page_size))
        _int_field(self, "vcpus", 1, limits.MAX_VCPUS)
        _str(self, "guest_kind", self.guest_kind, limits.MAX_SHORT_STR_CHARS)
        if not isinstance(self.cpu_features, (dict, list, tuple)):
            raise _fail(self, "cpu_features", f"must be a dict or a sequence, got {type(self.cpu_features).__name__}")
        _set(self, "cpu_features", _freeze_feature(self, self.cpu_features, 0))
        if isinstance(self.cpu_features, dict):
            _x86_features(self, self.cpu_features)
        _choice(self, "dirty_tracking", self.dirty_tracking, DIRTY_TRACKING_MODES)
        _choice(self, "arch", self.arch, ARCHES)
        if self.verify is not None:
            _choice(self, "verify", self.verify, VERIFY_MODES)

    def slot_pages(self) -> dict[int, int]:
        """slot -> number of pages in it: what every PageBatch is checked against."""
        return {region.slot: region.size // self.page_size for region in self.memory}


@dataclass(frozen=True, slots=True)
class Accept(Event):
    """Target -> source: the target can host this VM; pages may flow."""


@dataclass(frozen=True, slots=True)
class Abort(Event):
    """Either side, while DESIGN section 5 allows it: the migration is over; the source keeps
    the VM, the target discards its copy."""

    reason: str

    def __post_init__(self) -> None:
        _str(self, "reason", self.reason, limits.MAX_REASON_CHARS)

    @classmethod
    def from_text(cls, text: str) -> Abort:
        """An Abort for any text (an exception's message): control characters become spaces,
        and the result is cut to the bound. The constructor refuses such text instead."""
        line = "".join(char if char.isprintable() else " " for char in str(text)).strip()
        return cls(line[: limits.MAX_REASON_CHARS] or "aborted")


# --- memory and state ---------------------------------------------------------------------------


def _indices(owner: object, name: str, value: object) -> PageIndices:
    """A 1-D, C-contiguous uint64 array; a plain sequence of ints is converted."""
    if isinstance(value, np.ndarray):
        if value.dtype != np.dtype(np.uint64):
            raise _fail(owner, name, f"must have dtype uint64, got {value.dtype}")
        array = value
    else:
        try:
            array = np.array(value, dtype=np.uint64)
        except (TypeError, ValueError, OverflowError) as exc:
            raise _fail(owner, name, f"must be page indices (uint64): {exc}") from None
    if array.ndim != 1:
        raise _fail(owner, name, f"must be 1-D, got {array.ndim}-D")
    if not array.flags.c_contiguous:
        raise _fail(owner, name, "must be C-contiguous (use np.ascontiguousarray)")
    return array


@dataclass(frozen=True, slots=True, eq=False)
class PageBatch(Event):
    """Source -> target: pages of one memslot in one round.

    `pages` are page indices within the slot whose contents follow in `data`, in order;
    `zero_pages` are indices of pages that are all zero (no data). `data` is any C-contiguous
    buffer of len(pages) * page_size bytes; `send_buffers` passes it to the edge untouched. On
    receive, `data` is a read-only memoryview and the index arrays are read-only views of the
    received payload. Compared by identity (numpy arrays have no single truth value).
    """

    slot: int
    round: int
    pages: PageIndices
    zero_pages: PageIndices
    data: Buffer

    def __post_init__(self) -> None:
        _int_field(self, "slot", 0, limits.U32_MAX)
        _int_field(self, "round", 0, limits.U32_MAX)
        pages = _indices(self, "pages", self.pages)
        zero = _indices(self, "zero_pages", self.zero_pages)
        _set(self, "pages", pages)
        _set(self, "zero_pages", zero)
        try:
            view = as_view(self.data)
        except TypeError:
            raise _fail(self, "data", f"must be a buffer, got {type(self.data).__name__}") from None
        if not view.c_contiguous:
            raise _fail(self, "data", "must be a C-contiguous buffer")
        if pages.size + zero.size == 0:
            raise _fail(self, "pages", "and zero_pages are both empty: a batch carries pages")
        if pages.size == 0 and view.nbytes:
            raise _fail(self, "data", f"holds {view.nbytes} bytes but pages is empty")
        if pages.size and view.nbytes % pages.size:
            raise _fail(self, "data", f"holds {view.nbytes} bytes, not a whole page for each of {pages.size} pages")

    @property
    def data_bytes(self) -> int:
        return as_view(self.data).nbytes


@dataclass(frozen=True, slots=True)
class Progress(Event):
    """Target -> source: what has arrived so far (for the source's bandwidth and progress)."""

    bytes_received: int
    pages_received: int
    round: int

    def __post_init__(self) -> None:
        _int_field(self, "bytes_received", 0, limits.U64_MAX)
        _int_field(self, "pages_received", 0, limits.U64_MAX)
        _int_field(self, "round", 0, limits.U32_MAX)


@dataclass(frozen=True, slots=True)
class DeviceState(Event):
    """Source -> target, after the pages: vCPU or device state, opaque to the transport."""

    kind: str
    blob: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _str(self, "kind", self.kind, limits.MAX_SHORT_STR_CHARS)
        _set(self, "blob", _bytes(self, "blob", self.blob, 0, limits.MAX_DEVICE_STATE_BYTES))


@dataclass(frozen=True, slots=True)
class Done(Event):
    """Source -> target: everything was sent.

    pages_total is the number of page entries (data and zero) this connection's PageBatches
    carried (`Connection.pages_sent`); both sides check it. With verify="full", digest is the
    source's digest of guest memory and the target must match it before Loaded. `rounds`, when
    the source sends it (optional: older sources do not), is how many dirty rounds it ran before
    the downtime, so that both sides report the same count (the downtime's final pass is no round).
    """

    pages_total: int
    digest: bytes | None
    verify: Literal["full", "off"]
    rounds: int | None = None

    def __post_init__(self) -> None:
        _int_field(self, "pages_total", 0, limits.U64_MAX)
        if self.rounds is not None:
            _int_field(self, "rounds", 0, limits.U32_MAX)
        _set(self, "digest", _digest(self, "digest", self.digest))
        _choice(self, "verify", self.verify, VERIFY_MODES)
        if self.verify == "full" and self.digest is None:
            raise _fail(self, "digest", 'is required with verify="full"')


# --- cutover (DESIGN section 5) -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Loaded(Event):
    """Target -> source: everything is loaded and verified; the target waits for Commit.

    Optional (older targets do not send them): what loading cost the target, in microseconds,
    `digest_us` its digest of guest memory after Done (a digest begun when the state arrived,
    VmDescription.verify: only the wait for what was left of it) and `load_us` all of it from
    Done to Loaded; the source learns the downtime's costs from them instead of guessing the
    target's share.
    """

    digest: bytes | None
    digest_us: int | None = None
    load_us: int | None = None

    def __post_init__(self) -> None:
        _set(self, "digest", _digest(self, "digest", self.digest))
        for name in ("digest_us", "load_us"):
            if getattr(self, name) is not None:
                _int_field(self, name, 0, limits.U32_MAX)


@dataclass(frozen=True, slots=True)
class Commit(Event):
    """Source -> target: the VM now belongs to the target. The source may not abort after it."""


@dataclass(frozen=True, slots=True)
class Running(Event):
    """Target -> source: the target resumed the VM; the source may release its copy.

    Optional (older targets do not send them), in microseconds from COMMIT's arrival: `resume_us`
    until the vCPUs were resumed, `reply_us` until this message left. With them the source
    places the resume on its own clock (half the round trip that remains is the way there) and
    reports the downtime the guest saw, beside its own pause-to-RUNNING.
    """

    resume_us: int | None = None
    reply_us: int | None = None

    def __post_init__(self) -> None:
        for name in ("resume_us", "reply_us"):
            if getattr(self, name) is not None:
                _int_field(self, name, 0, limits.U32_MAX)


# --- in-doubt resolution ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query(Event):
    """Source -> target on a new connection: what became of this migration?"""

    migration_id: str

    def __post_init__(self) -> None:
        _str(self, "migration_id", self.migration_id, limits.MAX_NAME_CHARS)


@dataclass(frozen=True, slots=True)
class QueryResult(Event):
    """Target -> source. "running": the target runs the VM. "aborted": the target discarded its
    copy for good. "unknown": it never heard of the migration. The source may resume on the last
    two only."""

    migration_id: str
    state: Literal["running", "aborted", "unknown"]

    def __post_init__(self) -> None:
        _str(self, "migration_id", self.migration_id, limits.MAX_NAME_CHARS)
        _choice(self, "state", self.state, QUERY_STATES)


# --- ending -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Close(Event):
    """Either side, once the conversation is over: this side sends nothing more.

    After Running, the source's Close may carry how the migration went as the source measured
    it (optional, in microseconds): `downtime_us` from the pause to RUNNING, `guest_downtime_us`
    from the pause to the target's resume (see Running) and `total_us` from its start, which
    only the source can time, so that the target reports the same numbers.
    """

    downtime_us: int | None = None
    total_us: int | None = None
    guest_downtime_us: int | None = None

    def __post_init__(self) -> None:
        for name in ("downtime_us", "total_us", "guest_downtime_us"):
            if getattr(self, name) is not None:
                _int_field(self, name, 0, limits.U64_MAX)


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """Not a message: next_event's report that the peer's bytes ended (EOF).

    clean is True when the conversation had ended (after Running, QueryResult, or the peer's
    Close); anything else is a broken link, and the edge decides what that means (DESIGN 5).
    """

    clean: bool

    def __post_init__(self) -> None:
        if not isinstance(self.clean, bool):
            raise _fail(self, "clean", f"must be a bool, got {type(self.clean).__name__}")


class _NeedData:
    """next_event's answer when no complete event is buffered: feed more bytes."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
NeedData = _NeedData

MESSAGE_EVENTS: tuple[type[Event], ...] = (
    Hello,
    Auth,
    VmDescription,
    Accept,
    Abort,
    PageBatch,
    Progress,
    DeviceState,
    Done,
    Loaded,
    Commit,
    Running,
    Query,
    QueryResult,
    Close,
)
"""Every event that travels on the wire (ConnectionClosed does not)."""

VM_DATA_EVENTS: frozenset[type[Event]] = frozenset({VmDescription, PageBatch, DeviceState, Done, Query})
"""Events that carry VM data or ask about a VM: never before authentication (DESIGN 6)."""
