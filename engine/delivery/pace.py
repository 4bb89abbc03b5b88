"""How fast one connection may send, learned from the destination's answers."""

from __future__ import annotations

from dataclasses import dataclass

MIN_INTERVAL = 0.05
MAX_INTERVAL = 10.0


@dataclass
class Pace:
    """How fast one connection may send, learned from the destination's answers."""

    hold_until: float = 0.0
    """No request before this: the backoff after a transient failure."""
    interval: float = 0.0
    """Least time between requests: doubles on every 429, decays with each success."""
    last_send: float = 0.0
    item_cap: int | None = None
    """Items per request after the destination refused a size; doubles back on success."""
    probe: bool = False
    """Send a single item first (after a pause), to test the credentials cheaply."""

    def slow_down(self) -> None:
        self.interval = min(MAX_INTERVAL, max(MIN_INTERVAL, self.interval * 2))

    def succeeded(self, items: int, max_items: int) -> None:
        self.probe = False
        self.interval = self.interval * 0.9 if self.interval > MIN_INTERVAL / 2 else 0.0
        if self.item_cap is not None:
            self.item_cap = self.item_cap * 2 if self.item_cap * 2 < max_items else None
