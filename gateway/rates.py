"""Rates over a sliding window: readings stored and delivered per hour, for status and autonomy."""

from __future__ import annotations

from collections import deque


class Rate:
    """Events per hour over the last ``window_ms`` of events."""

    def __init__(self, window_ms: int = 10 * 60 * 1000):
        self.window_ms = window_ms
        self.events: deque[tuple[int, int]] = deque()
        self.total = 0

    def add(self, now_ms: int, n: int) -> None:
        self.events.append((now_ms, n))
        self.total += n
        while self.events and self.events[0][0] < now_ms - self.window_ms:
            self.total -= self.events.popleft()[1]

    def per_hour(self) -> float:
        if len(self.events) < 2:
            return 0.0
        span = max(self.events[-1][0] - self.events[0][0], 1000)
        return (self.total - self.events[0][1]) * 3_600_000 / span
