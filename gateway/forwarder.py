"""The forwarder: buffer → batched, acknowledged messages.

It claims batches from the :class:`~gateway.buffer.Buffer`, turns each into JSON messages of at
most 100 readings and 128 KB per site (``dt/<app>/<site>/<thing>/raw``, plus ``.../scored``
when a scorer is set), publishes them at QoS 1 through a
:class:`~gateway.publishers.Publisher`, and acknowledges the claim in the buffer only when
every one of its messages has its PUBACK.

- A bounded window of messages is in flight; PUBACKs are acknowledged as they arrive.
- A retryable failure (connection lost, no PUBACK within ``ack_timeout_s`` while connected)
  waits for what is in flight to settle, hands the claims back to the buffer, and retries
  after an exponential backoff with full jitter.
- A message that can never be delivered (oversize, a topic IoT Core refuses) is quarantined
  with its reason and counted as settled: it is never retried forever.
- IoT Core's per-connection limits (100 publishes/s, 512 KB/s) are enforced by the MQTT5
  client's flow control unless the publisher's target is marked local.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Protocol

from gateway.buffer import Buffer, Claim
from gateway.errors import RetryableError, UndeliverableError
from gateway.messages import chunks
from gateway.publishers import Publisher
from gateway.topics import check_topic, topic

log = logging.getLogger(__name__)


class Scorer(Protocol):
    """What the forwarder needs of a scorer: scored rows for a claim's rows."""

    def score_rows(self, rows: list[tuple[int, int, float]], meters: dict) -> tuple[str, list[list | None]]:
        """The version of the model used, and ``[meter key, ts, value, expected, score, flag]``
        per row, or None for a row that cannot be scored (it is forwarded raw only)."""
        ...


class Backoff:
    """Exponential backoff with full jitter: a delay drawn from [0, min(cap, base · 2^n)]."""

    def __init__(self, base_s: float = 0.5, cap_s: float = 60.0, rng: random.Random | None = None):
        self.base_s = base_s
        self.cap_s = cap_s
        self.attempt = 0
        self.rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self.cap_s, self.base_s * (2 ** self.attempt))
        self.attempt += 1
        return self.rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class _InFlight:
    __slots__ = ("claim", "remaining", "sent_at")

    def __init__(self, claim: Claim, remaining: int, sent_at: float):
        self.claim = claim
        self.remaining = remaining
        self.sent_at = sent_at


class Forwarder:
    def __init__(
        self,
        buffer: Buffer,
        publisher: Publisher,
        thing: str,
        *,
        app: str = "meters",
        batch_size: int = 100,
        claim_size: int = 1000,
        window: int = 64,
        qos: int = 1,
        ack_timeout_s: float = 30.0,
        backoff: Backoff | None = None,
        scorer: Scorer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.buffer = buffer
        self.publisher = publisher
        self.thing = thing
        self.app = app
        self.batch_size = batch_size
        self.claim_size = claim_size
        self.window = window
        self.qos = qos
        self.ack_timeout_s = ack_timeout_s
        self.backoff = backoff or Backoff()
        self.scorer = scorer
        self.clock = clock
        self.wake = threading.Event()  # set by new readings and completed publishes
        self.stop_event = threading.Event()  # ends a backoff early; run() uses its caller's
        self.settled = threading.Condition()  # notified whenever publishes complete
        self._done: queue.SimpleQueue[tuple[int, BaseException | None]] = queue.SimpleQueue()
        self._inflight: dict[int, _InFlight] = {}
        self._failed: BaseException | None = None
        self._last_progress = clock()
        self.published = 0
        self.failures = 0
        self.unscored = 0
        self.scoring_error: str | None = None
        buffer.add_listener(self.wake.set)

    # ------------------------------------------------------------------ the loop

    def run(self, stop: threading.Event, drain_timeout_s: float = 10.0) -> None:
        """Forward until ``stop`` is set, then wait up to ``drain_timeout_s`` for PUBACKs."""
        self.stop_event = stop
        while not stop.is_set():
            if not self.step():
                self.wake.wait(0.2)
                self.wake.clear()
        deadline = self.clock() + drain_timeout_s
        while self._inflight and self.clock() < deadline:
            self._settle()
            if self._inflight:
                self.wake.wait(0.05)
                self.wake.clear()
        self._settle()

    def step(self) -> bool:
        """Do one unit of work; False when there was nothing to do (the caller may wait)."""
        progressed = self._settle()
        if self._failed is not None:
            if self._inflight:
                self._check_timeouts()
                return progressed
            delay = self.backoff.next()
            log.warning("delivery failed (%s); retrying in %.1f s", self._failed, delay)
            self.buffer.release_all()
            self._failed = None
            # Wait on stop only: new readings set `wake`, and must not cut a backoff short.
            self.stop_event.wait(delay)
            return True
        self._check_timeouts()
        if not self.publisher.connected:
            return progressed
        if self.messages_in_flight >= self.window:
            return progressed
        claim = self.buffer.claim(self.claim_size)
        if claim is None:
            return progressed
        self._send(claim)
        return True

    def drain(self, timeout_s: float = 30.0) -> None:
        """Forward until the buffer is empty and nothing is in flight (tests, backfills, bench)."""
        deadline = self.clock() + timeout_s
        while self.clock() < deadline:
            if not self.step():
                if not self._inflight and self.buffer.pending() == 0:
                    return
                self.wake.wait(0.05)
                self.wake.clear()
        raise TimeoutError(f"forwarder did not drain within {timeout_s} s: {self.buffer.pending()} pending")

    # ------------------------------------------------------------------ sending

    def _messages(self, claim: Claim) -> list[tuple[str, bytes, int]]:
        """(topic, payload, readings) for every message of a claim."""
        meters = self.buffer.meters
        by_site: dict[str, list] = {}
        for ts, mid, value in claim.rows:
            m = meters[mid]
            by_site.setdefault(m.site, []).append([m.key, ts, value])
        out = self._site_messages("raw", by_site)
        if self.scorer is not None:
            try:
                version, scored = self.scorer.score_rows(claim.rows, meters)
            except Exception as exc:  # scoring never stops delivery: the raw readings still go
                self.unscored += len(claim.rows)
                reason = f"{type(exc).__name__}: {exc}"
                if reason != self.scoring_error:
                    log.error("scoring failed, forwarding raw only: %s", reason)
                self.scoring_error = reason
                return out
            self.scoring_error = None
            by_site = {}
            for (ts, mid, value), srow in zip(claim.rows, scored):
                if srow is None:
                    self.unscored += 1
                    continue
                by_site.setdefault(meters[mid].site, []).append(srow)
            out += self._site_messages("scored", by_site, model=version)
        return out

    def _site_messages(self, kind: str, by_site: dict[str, list], model: str | None = None) -> list:
        """(topic, payload, readings) of each site's rows, on ``dt/<app>/<site>/<thing>/<kind>``."""
        out = []
        for site, rows in by_site.items():
            name = topic(self.app, site, self.thing, kind)
            for payload, part in chunks(self.thing, site, rows, self.batch_size, model=model):
                out.append((name, payload, len(part)))
        return out

    def _send(self, claim: Claim) -> None:
        messages = self._messages(claim)
        entry = _InFlight(claim, len(messages), self.clock())
        self._inflight[claim.id] = entry
        for name, payload, n in messages:
            try:
                check_topic(name)
                if len(payload) > 128 * 1024:
                    raise UndeliverableError(f"payload is {len(payload)} bytes, more than IoT Core's 131072")
                fut = self.publisher.publish(name, payload, self.qos)
            except UndeliverableError as exc:
                self._dead_letter(exc, payload, name, n)
                self._done.put((claim.id, None))
                continue
            except RetryableError as exc:
                self._done.put((claim.id, exc))
                continue
            fut.add_done_callback(self._callback(claim.id, name, payload, n))
            self.published += 1

    def _callback(self, claim_id: int, name: str, payload: bytes, n: int) -> Callable[[Future], None]:
        def done(fut: Future) -> None:
            exc = fut.exception()
            if isinstance(exc, UndeliverableError):
                self._dead_letter(exc, payload, name, n)
                exc = None
            self._done.put((claim_id, exc))
            self.wake.set()

        return done

    def _dead_letter(self, exc: BaseException, payload: bytes, name: str, n: int) -> None:
        log.error("message to %s quarantined: %s", name, exc)
        self.buffer.quarantine_message(str(exc), payload, name, n)

    # ------------------------------------------------------------------ settling

    @property
    def messages_in_flight(self) -> int:
        return sum(e.remaining for e in self._inflight.values())

    def _settle(self) -> bool:
        """Handle completed publishes; acknowledge claims whose messages all completed."""
        done: list[Claim] = []
        any_done = False
        while True:
            try:
                item = self._done.get_nowait()
            except queue.Empty:
                break
            any_done = True
            claim_id, exc = item
            entry = self._inflight.get(claim_id)
            if entry is None:  # released after a failure; its late completion changes nothing
                continue
            if exc is not None:
                self.failures += 1
                if self._failed is None:
                    self._failed = exc
                del self._inflight[claim_id]
                continue
            entry.remaining -= 1
            if entry.remaining == 0:
                del self._inflight[claim_id]
                done.append(entry.claim)
        if done:
            self.buffer.ack(*done)
            self.backoff.reset()
        if any_done:
            self._last_progress = self.clock()
            with self.settled:
                self.settled.notify_all()
        return any_done

    def wait_settled(self, timeout: float) -> bool:
        """Wait until nothing is in flight (another thread runs the loop); False on timeout."""
        with self.settled:
            return self.settled.wait_for(lambda: not self._inflight, timeout)

    def _check_timeouts(self) -> None:
        if not self._inflight:
            self._last_progress = self.clock()
            return
        if not self.publisher.connected:
            # An outage is not a timeout: the MQTT client holds QoS 1 publishes until it reconnects.
            self._last_progress = self.clock()
            return
        if self.clock() - self._last_progress > self.ack_timeout_s:
            self.failures += 1
            self._failed = RetryableError(f"no PUBACK within {self.ack_timeout_s} s")
            self._inflight.clear()

    def status(self) -> dict[str, Any]:
        return {
            "in_flight_claims": len(self._inflight),
            "in_flight_messages": self.messages_in_flight,
            "published": self.published,
            "failures": self.failures,
            "unscored": self.unscored,
            "scoring_error": self.scoring_error,
            "connected": self.publisher.connected,
        }
