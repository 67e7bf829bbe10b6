"""Every bound the protocol puts on sizes, counts and values, each with the reason for it.

DESIGN section 6: sizes, counts, indices and versions from the wire are bounded before use.
"""

from __future__ import annotations

from typing import Final

KiB: Final = 1024
MiB: Final = 1024 * KiB

# --- versions -----------------------------------------------------------------------------------

PROTOCOL_VERSION_MIN: Final = 2
PROTOCOL_VERSION_MAX: Final = 2
"""What this implementation speaks. HELLO carries a range; the highest common version wins.
Version 2 seals every frame after a psk handshake (seal.py); a version 1 peer sends them in the
clear, so it is refused at HELLO rather than met half way."""

VERSION_LIMIT: Final = 0xFFFF
"""Versions are small integers; anything above u16 is noise or hostile."""

# --- framing ------------------------------------------------------------------------------------

FRAME_PREFIX_BYTES: Final = 8
"""u32 BE header length, u32 BE payload length."""

MAX_HEADER_BYTES: Final = 64 * KiB
"""A header is a msgpack map of a few fields. The largest, VmDescription, holds the memory layout
and the CPU features: a few KiB. 64 KiB leaves room and bounds what one frame makes us buffer and
parse before its type is known."""

HARD_MAX_PAYLOAD_BYTES: Final = 64 * MiB
"""No payload is ever larger, whatever was negotiated: checked on the 8-byte prefix, before a byte
of the payload is buffered."""

DEFAULT_MAX_BATCH_BYTES: Final = 8 * MiB
"""Default PageBatch payload bound offered in HELLO: 2048 pages of 4 KiB, large enough to keep a
10 Gbit/s link busy with one sendmsg per batch, small enough that a batch is a few ms of work."""

MIN_MAX_BATCH_BYTES: Final = 1 * MiB
"""A peer may offer less than the default, but a batch must hold at least one 64 KiB page with
its index; 1 MiB keeps the per-batch overhead negligible."""

MAX_DEVICE_STATE_BYTES: Final = 16 * MiB
"""One DeviceState blob (a vCPU's registers and MSRs, an irqchip, a device): kilobytes in practice;
16 MiB bounds what the target buffers for state that is opaque to the transport."""

RECEIVE_BUFFER_LIMIT: Final = 2 * (FRAME_PREFIX_BYTES + MAX_HEADER_BYTES + HARD_MAX_PAYLOAD_BYTES)
"""Bytes fed by receive_data and not yet consumed by next_event. An edge that drains next_event
until NEED_DATA before reading again holds at most one incomplete frame plus one read; twice the
largest frame is generous, and more means the edge stopped draining events (its bug)."""

SCRATCH_BYTES: Final = 64 * KiB
"""Size of the buffer handed out by get_receive_buffer outside a payload: one header."""

# --- msgpack decoding (header maps from the peer) -----------------------------------------------
# The header is at most MAX_HEADER_BYTES, which already bounds these; the explicit limits make the
# decoder refuse a hostile object before building it.

MSGPACK_MAX_STR: Final = 4 * KiB
MSGPACK_MAX_BIN: Final = 4 * KiB
MSGPACK_MAX_ARRAY: Final = 4 * KiB
MSGPACK_MAX_MAP: Final = 1 * KiB

# --- field values -------------------------------------------------------------------------------

NONCE_BYTES: Final = 32
MAC_BYTES: Final = 32
"""HMAC-SHA256."""

MIN_PSK_BYTES: Final = 16
"""A pre-shared key shorter than 128 bits is a configuration error, not a key."""

MAX_DIGEST_BYTES: Final = 64
"""SHA-512 or BLAKE2b-512 at most."""

MAX_NAME_CHARS: Final = 255
"""Node names, VM names, migration ids: identifiers, not documents."""

MAX_SHORT_STR_CHARS: Final = 64
"""Capability names, guest kinds, device state kinds."""

MAX_CAPABILITIES: Final = 64
MAX_REASON_CHARS: Final = 1024
"""An abort reason is one line of text for an operator."""

MAX_MEMORY_REGIONS: Final = 1024
"""KVM allows more slots, but a VM we host has a handful; the header bound alone allows ~3000."""

GUEST_PHYS_LIMIT: Final = 1 << 52
"""MAXPHYADDR is at most 52 bits on x86-64 and arm64: no guest RAM lies above."""

MAX_VCPUS: Final = 4096
"""KVM_MAX_VCPUS on x86-64 with MAXSMP."""

PAGE_SIZES: Final = frozenset({4 * KiB, 16 * KiB, 64 * KiB})
"""Base page sizes of x86-64 and arm64."""

MAX_FEATURE_DEPTH: Final = 8
"""cpu_features is a table of flags and leaves; nesting deeper than this is not a feature list."""

# x86 machine facts a VM description may carry in cpu_features (the target builds and checks
# with them before ACCEPT, so that the downtime does not):
MAX_CPUID_ENTRIES: Final = 256
"""KVM_MAX_CPUID_ENTRIES: "vcpu_cpuid", the table every vCPU of the VM has."""

CPUID_ENTRY_BYTES: Final = 40
"""struct kvm_cpuid_entry2: each "vcpu_cpuid" entry, raw."""

MAX_MSR_INDICES: Final = 1024
""""msr_indices", the MSRs a state of the VM carries: KVM lists 40 here, a few hundred at most."""

MIN_XSAVE_BYTES: Final = 4096
MAX_XSAVE_BYTES: Final = 64 * KiB
""""xsave_bytes": struct kvm_xsave is at least 4096 bytes; AMX needs ~11 KiB."""

U32_MAX: Final = 0xFFFF_FFFF
U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF
I64_MIN: Final = -(1 << 63)
