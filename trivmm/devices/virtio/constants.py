"""Numbers from the virtio 1.x specification (OASIS virtio v1.2, section 2.7: split virtqueues).

Every field in a virtqueue is little-endian. Offsets are in bytes from the start of the
part they belong to.
"""

from __future__ import annotations

__all__ = [
    "VIRTQ_DESC_F_NEXT", "VIRTQ_DESC_F_WRITE", "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_AVAIL_F_NO_INTERRUPT", "VIRTQ_USED_F_NO_NOTIFY",
    "VIRTIO_F_INDIRECT_DESC", "VIRTIO_F_EVENT_IDX",
    "MAX_QUEUE_SIZE", "DESC_SIZE", "DESC_ALIGN", "AVAIL_ALIGN", "USED_ALIGN",
    "AVAIL_FLAGS", "AVAIL_IDX", "AVAIL_RING", "AVAIL_ELEM_SIZE",
    "USED_FLAGS", "USED_IDX", "USED_RING", "USED_ELEM_SIZE",
    "desc_table_size", "avail_ring_size", "used_ring_size",
]  # fmt: skip

# struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }
VIRTQ_DESC_F_NEXT = 1  # the chain continues at `next`
VIRTQ_DESC_F_WRITE = 2  # device-writable (otherwise device-readable)
VIRTQ_DESC_F_INDIRECT = 4  # `addr`/`len` hold a table of descriptors
DESC_SIZE = 16

# struct virtq_avail { le16 flags; le16 idx; le16 ring[size]; le16 used_event; }
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
AVAIL_FLAGS, AVAIL_IDX, AVAIL_RING = 0, 2, 4
AVAIL_ELEM_SIZE = 2

# struct virtq_used { le16 flags; le16 idx; struct { le32 id; le32 len; } ring[size]; le16 avail_event; }
VIRTQ_USED_F_NO_NOTIFY = 1
USED_FLAGS, USED_IDX, USED_RING = 0, 2, 4
USED_ELEM_SIZE = 8

# Feature bits (reserved range 24..41) that change how a split ring is read.
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29

# "Queue Size value is always a power of 2. The maximum Queue Size value is 32768."
MAX_QUEUE_SIZE = 32768

# Minimum alignment of each part's first byte.
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4


def desc_table_size(size: int) -> int:
    return DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    """flags, idx, ring[size], used_event: counted whether or not EVENT_IDX is negotiated."""
    return 6 + AVAIL_ELEM_SIZE * size


def used_ring_size(size: int) -> int:
    """flags, idx, ring[size], avail_event."""
    return 6 + USED_ELEM_SIZE * size
