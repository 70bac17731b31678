"""virtio 1.x devices. ``queue``: the device side of a split virtqueue, hostile-proof."""

from trivmm.devices.virtio.constants import (
    MAX_QUEUE_SIZE,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
)
from trivmm.devices.virtio.queue import (
    MAX_CHAIN_BYTES,
    MAX_INDIRECT,
    DescriptorChain,
    QueueState,
    SplitQueue,
    VirtqueueError,
    vring_need_event,
)

__all__ = [
    "SplitQueue", "DescriptorChain", "QueueState", "VirtqueueError", "vring_need_event",
    "MAX_INDIRECT", "MAX_CHAIN_BYTES", "MAX_QUEUE_SIZE",
    "VIRTQ_DESC_F_NEXT", "VIRTQ_DESC_F_WRITE", "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_AVAIL_F_NO_INTERRUPT", "VIRTQ_USED_F_NO_NOTIFY",
    "VIRTIO_F_INDIRECT_DESC", "VIRTIO_F_EVENT_IDX",
]  # fmt: skip
