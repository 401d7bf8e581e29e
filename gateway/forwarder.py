"""The forwarder: buffer → batched, acknowledged messages.

It claims batches from the :class:`~gateway.buffer.Buffer`, turns each into JSON messages of at
most 100 readings and 128 KB per site (``dt/<app>/<site>/<thing>/raw``, plus ``.../scored``
for readings scored at ingest; ``$aws/rules/<rule>/dt/...`` with a Basic Ingest rule), publishes them
at QoS 1 through a :class:`~gateway.publishers.Publisher`, and acknowledges the claim in the
buffer only when every one of its messages has its PUBACK.

- A bounded window of messages is in flight; PUBACKs are acknowledged as they arrive.
- **Timeouts are per claim.** A claim whose oldest message has had no PUBACK for
  ``claim_timeout_s`` while connected is a retryable failure, whatever else completes
  meanwhile. ``claim_timeout_s`` is ``ack_timeout_s`` (which the runner also gives awscrt as its
  operation timeout) plus the time a full window can wait in awscrt's queue under IoT Core's
  512 KB/s (``window`` × 128 KB / 512 KB/s), plus the publisher's ``delivery_window_s`` when it
  has one (the IPC publisher's receipt delivery: the time its resends may take, see
  :mod:`gateway.publishers.ipc`): the client fails a lost publish first, and the forwarder never
  sends again what the client still holds.
- A retryable failure (connection lost, a timeout) waits for what is in flight to settle, hands
  the claims back to the buffer, and retries after an exponential backoff with full jitter.
  A completion that arrives after its claim was handed back is ignored: never acknowledged,
  never counted.
- **NOT_AUTHORIZED is a configuration fault, not a message fault.** The thing's policy refuses
  the topic, and will refuse every message to it until a person fixes it. The forwarder keeps
  the readings (the claims go back to the buffer, nothing is acknowledged or quarantined),
  logs one ERROR, reports ``blocked`` in the stage health (``gateway status``), and sends one
  claim at a time, waiting ``auth_retry_s`` (300 s) after each refusal, until every refused
  topic has been accepted again; then it logs that it cleared. (A refused claim's messages to
  allowed topics arrive again on each try: duplicates, which QoS 1 allows.)
- A message that can never be delivered (oversize, a topic IoT Core refuses, PUBACK
  TOPIC_NAME_INVALID) is quarantined with its reason and counted as settled.
- IoT Core's per-connection limits (100 publishes/s, 512 KB/s) are enforced by the MQTT5
  client's flow control unless the publisher's target is marked local.

**When the loop itself fails** (:meth:`Forwarder.run` with a ``stage``, as the runner does):
an exception out of a step drops what is in flight, hands the claims back, and goes to the
stage, which decides between retrying after a backoff and giving up. The runner's policy
(:class:`gateway.runner.Stage`): the buffer's transient errors (locked, busy, disk full,
``sqlite3.OperationalError``), :class:`~gateway.errors.RetryableError` and ``OSError`` are
retried with backoff; the stage is dead when they last ``dead_after_s`` (300 s) without a step
in between that succeeds, or at once on any other error (a corrupt buffer, a bug, a value json
cannot encode). A dead stage shows in ``gateway status`` and makes ``gateway run`` exit 1.
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
from gateway.errors import NotAuthorizedError, PublishError, RetryableError, UndeliverableError
from gateway.messages import chunks
from gateway.publishers import Publisher
from gateway.topics import MAX_BYTES_PER_S, MAX_PAYLOAD_BYTES, basic_ingest, check_message, topic

log = logging.getLogger(__name__)


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
    """A claim in flight: its messages without a completion, and when its clock started
    (when it was sent, or when the connection came back)."""

    __slots__ = ("claim", "remaining", "sent_at")

    def __init__(self, claim: Claim, remaining: int, sent_at: float):
        self.claim = claim
        self.remaining = remaining
        self.sent_at = sent_at


class StageHook(Protocol):
    """What :meth:`Forwarder.run` reports to (the runner's :class:`gateway.runner.Stage`)."""

    def ok(self) -> None:
        """A step succeeded: a run of failures, if any, is over."""

    def failed(self, exc: BaseException) -> float | None:
        """A step raised ``exc``: the delay before the next try, or None when the stage is dead."""

    def blocked(self, reason: str | None) -> None:
        """Delivery is refused by policy (``reason``), or no longer (None)."""


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
        auth_retry_s: float = 300.0,
        basic_ingest_rule: str | None = None,
        backoff: Backoff | None = None,
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
        self.claim_timeout_s = self.claim_timeout(window)
        self.auth_retry_s = auth_retry_s
        self.basic_ingest_rule = basic_ingest_rule
        self.backoff = backoff or Backoff()
        self.clock = clock
        self.stage: StageHook | None = None
        self.wake = threading.Event()  # set by new readings and completed publishes
        self.stop_event = threading.Event()  # ends a backoff early; run() uses its caller's
        self.settled = threading.Condition()  # notified whenever publishes complete
        self._done: queue.SimpleQueue[tuple[_InFlight, BaseException | None, tuple]] = queue.SimpleQueue()
        self._inflight: dict[int, _InFlight] = {}
        self._failed: BaseException | None = None
        self.blocked: str | None = None  # why the policy refuses delivery, while it does
        self._refused: set[str] = set()  # the topics refused since, and not accepted again
        self.published = 0
        self.failures = 0
        buffer.add_listener(self.wake.set)

    def claim_timeout(self, window: int) -> float:
        """The per-claim timeout for a window of ``window`` messages: the client's ack timeout, plus
        what a full window can wait in its queue at 512 KB/s, plus the publisher's own delivery
        window (receipt delivery over IPC: every resend it may make; 0 for other publishers)."""
        return (self.ack_timeout_s + window * MAX_PAYLOAD_BYTES / MAX_BYTES_PER_S
                + float(getattr(self.publisher, "delivery_window_s", 0.0)))

    # ------------------------------------------------------------------ the loop

    def run(self, stop: threading.Event, drain_timeout_s: float = 10.0, stage: StageHook | None = None) -> None:
        """Forward until ``stop`` is set, then wait up to ``drain_timeout_s`` for PUBACKs.

        Without ``stage``, an exception out of a step ends the loop (it propagates). With one,
        the claims in flight go back to the buffer and ``stage.failed`` decides: retry after
        the delay it returns, or return (the stage is dead).
        """
        self.stop_event = stop
        self.stage = stage
        while not stop.is_set():
            try:
                worked = self.step()
            except Exception as exc:
                if stage is None:
                    raise
                try:
                    self.reset()
                except Exception as again:  # the buffer cannot even take the claims back
                    exc = again
                delay = stage.failed(exc)
                if delay is None:
                    return
                stop.wait(delay)
                continue
            if stage is not None:
                stage.ok()
            if not worked:
                self.wake.wait(0.2)
                self.wake.clear()
        deadline = self.clock() + drain_timeout_s
        try:
            while self._inflight and self.clock() < deadline:
                self._settle()
                if self._inflight:
                    self.wake.wait(0.05)
                    self.wake.clear()
            self._settle()
        except Exception as exc:  # stopping: what is not acknowledged is sent again on the next start
            if stage is None:
                raise
            log.error("forwarder: could not collect the last PUBACKs: %s: %s", type(exc).__name__, exc)

    def step(self) -> bool:
        """Do one unit of work; False when there was nothing to do (the caller may wait)."""
        progressed = self._settle()
        if self._failed is not None:
            if self._inflight:
                self._check_timeouts()
                return progressed
            failed, self._failed = self._failed, None
            self.buffer.release_all()
            if isinstance(failed, NotAuthorizedError):
                delay = self.auth_retry_s
                log.debug("delivery not authorized (%s); trying again in %.0f s", failed, delay)
            else:
                delay = self.backoff.next()
                log.warning("delivery failed (%s); retrying in %.1f s", failed, delay)
            # Wait on stop only: new readings set `wake`, and must not cut a backoff short.
            self.stop_event.wait(delay)
            return True
        self._check_timeouts()
        if not self.publisher.connected:
            return progressed
        if self.messages_in_flight >= self.window:
            return progressed
        if self.blocked is not None and self._inflight:
            return progressed  # while refused, one claim at a time finds out whether it cleared
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

    def reset(self) -> None:
        """Forget every claim in flight and hand the claims back to the buffer; their late
        completions are ignored."""
        self._inflight.clear()
        self._failed = None
        self.buffer.release_all()

    # ------------------------------------------------------------------ sending

    def _messages(self, claim: Claim) -> list[tuple[str, bytes, int]]:
        """(topic, payload, readings) for every message of a claim: per site, the raw readings,
        and the scored ones (scored at ingest, stored beside each reading) per model version."""
        meters, models = self.buffer.meters, self.buffer.models
        by_site: dict[str, list] = {}
        scored: dict[tuple[str, int], list] = {}
        for ts, mid, value, expected, score, flag, model in claim.rows:
            m = meters[mid]
            by_site.setdefault(m.site, []).append([m.key, ts, value])
            if expected is not None:
                scored.setdefault((m.site, model), []).append([m.key, ts, value, expected, score, flag])
        out = self._site_messages("raw", by_site)
        for (site, model), rows in scored.items():
            out += self._site_messages("scored", {site: rows}, model=models[model])
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
            if self.basic_ingest_rule is not None:
                name = basic_ingest(name, self.basic_ingest_rule)
            message = (name, payload, n)
            problem = check_message(name, payload, self.qos)
            if problem is not None:
                self._done.put((entry, UndeliverableError(problem), message))
                continue
            try:
                fut = self.publisher.publish(name, payload, self.qos)
            except PublishError as exc:  # the seam says futures fail; a publisher that raises is taken at its word
                self._done.put((entry, exc, message))
                continue
            fut.add_done_callback(self._callback(entry, message))
            self.published += 1

    def _callback(self, entry: _InFlight, message: tuple[str, bytes, int]) -> Callable[[Future], None]:
        def done(fut: Future) -> None:  # on the client's thread: hand over, decide nothing here
            self._done.put((entry, fut.exception(), message))
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
                entry, exc, (name, payload, n) = self._done.get_nowait()
            except queue.Empty:
                break
            any_done = True
            if self._inflight.get(entry.claim.id) is not entry:
                continue  # handed back already (a failure, a timeout): its late completion changes nothing
            if isinstance(exc, UndeliverableError):
                self._dead_letter(exc, payload, name, n)
            elif exc is not None:
                self.failures += 1
                if isinstance(exc, NotAuthorizedError):
                    self._refused.add(name)
                    self._block(str(exc))
                if self._failed is None or isinstance(exc, NotAuthorizedError):
                    self._failed = exc
                del self._inflight[entry.claim.id]
                continue
            elif self._refused:
                self._refused.discard(name)  # accepted now
            entry.remaining -= 1
            if entry.remaining == 0:
                del self._inflight[entry.claim.id]
                done.append(entry.claim)
        if done:
            self.buffer.ack(*done)
            self.backoff.reset()
        if self.blocked is not None and not self._refused:
            self._block(None)
        if any_done:
            with self.settled:
                self.settled.notify_all()
        return any_done

    def _block(self, reason: str | None) -> None:
        """Enter (a reason) or leave (None) the not-authorized state, saying so once each."""
        if (reason is None) == (self.blocked is None):
            return
        if reason is not None:
            log.error("delivery stopped: the broker refused a topic (%s). The readings are kept; "
                      "fix the thing's policy (or the topic). Trying again every %g s.", reason, self.auth_retry_s)
        else:
            log.warning("delivery authorized again: forwarding resumes (was: %s)", self.blocked)
        self.blocked = reason
        if self.stage is not None:
            self.stage.blocked(reason)

    def wait_settled(self, timeout: float) -> bool:
        """Wait until nothing is in flight (another thread runs the loop); False on timeout."""
        with self.settled:
            return self.settled.wait_for(lambda: not self._inflight, timeout)

    def _check_timeouts(self) -> None:
        """Fail each claim whose clock has run ``claim_timeout_s`` while connected."""
        if not self._inflight:
            return
        now = self.clock()
        if not self.publisher.connected:
            # An outage is not a timeout: each claim's clock starts again when the link is back.
            for entry in self._inflight.values():
                entry.sent_at = now
            return
        for cid in [cid for cid, e in self._inflight.items() if now - e.sent_at > self.claim_timeout_s]:
            del self._inflight[cid]
            self.failures += 1
            if self._failed is None:
                self._failed = RetryableError(f"no PUBACK within {self.claim_timeout_s:g} s")

    def oldest_in_flight_s(self) -> float | None:
        """Age of the oldest claim in flight by its clock (see :meth:`_check_timeouts`), or None."""
        if not self._inflight:
            return None
        return self.clock() - min(e.sent_at for e in self._inflight.values())

    def status(self) -> dict[str, Any]:
        return {
            "in_flight_claims": len(self._inflight),
            "in_flight_messages": self.messages_in_flight,
            "oldest_in_flight_s": self.oldest_in_flight_s(),
            "published": self.published,
            "failures": self.failures,
            "blocked": self.blocked,
            "unscored": self.buffer.stats.get("unscored", 0),
            "scoring_error": self.buffer.scoring_error,
            "connected": self.publisher.connected,
        }
