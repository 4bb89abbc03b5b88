"""What both engine processes (``tidegate serve`` and its ingest worker) do to the garbage
collector once start-up is done."""

from __future__ import annotations

import gc

# CPython runs a young collection once this many more container objects were made than
# freed (700 by default). Delivery makes about 36 per item, which live until their batch
# of up to 1,000 items is sent: at 700, collections ran many times per batch, found
# nothing to free, and cost 3-5 us per item (``bench.delivery_cpu``). At 100,000 a
# batch's objects are freed by reference counting before a collection runs.
YOUNG_COLLECTION_THRESHOLD = 100_000


def settle_collector() -> None:
    """Moves the objects start-up made (they live as long as the process) out of the
    collector's reach, so full passes no longer walk them (they stalled the event loop
    for 10-25 ms each), and raises the young-collection threshold."""
    gc.freeze()
    _young, *older = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *older)
