"""Lifecycle: component states (UpdateState) and the component-update handshake.

- ``UpdateState`` sets the caller's state to RUNNING or ERRORED (the only states a component
  reports); the runner sets the others (NEW, INSTALLED, STARTING, STOPPING, FINISHED, BROKEN)
  with :meth:`Lifecycle.set_state` and waits with :meth:`Lifecycle.wait_for_state`.
- ``SubscribeToComponentUpdates`` streams ``PreComponentUpdateEvent`` before a deployment
  changes components (:meth:`Lifecycle.offer_update`) and ``PostComponentUpdateEvent`` after it
  (:meth:`Lifecycle.post_update`).
- ``DeferComponentUpdate`` answers a pending offer with a delay (``recheckAfterMs``); the offer
  collects these deferrals.

None of these is authorized by the nucleus.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from awsiot.greengrasscoreipc import model

REPORTABLE = {model.ReportedLifecycleState.RUNNING, model.ReportedLifecycleState.ERRORED}


@dataclass(frozen=True)
class Deferral:
    component: str
    recheck_after_ms: int
    message: str | None


class Lifecycle:
    def __init__(self) -> None:
        self._states: dict[str, str] = {}
        self._cond = threading.Condition()
        self._listeners: list[Callable[[str, str], None]] = []
        self._update_subs: dict[int, tuple[str, Callable[[object], None]]] = {}
        self._offers: dict[str, dict[str, Deferral]] = {}  # deployment id -> component -> deferral
        self._next = 0

    def operations(self) -> dict:
        from emulator.nucleus.ipc import Operation
        return {
            "aws.greengrass#UpdateState": Operation(self._update_state_op),
            "aws.greengrass#SubscribeToComponentUpdates": Operation(self._subscribe_op),
            "aws.greengrass#DeferComponentUpdate": Operation(self._defer_op),
        }

    # -- states
    def add(self, name: str) -> None:
        with self._cond:
            self._states.setdefault(name, model.LifecycleState.NEW)

    def state(self, name: str) -> str | None:
        with self._cond:
            return self._states.get(name)

    def set_state(self, name: str, state: str) -> None:
        with self._cond:
            self._states[name] = state
            self._cond.notify_all()
            listeners = list(self._listeners)
        for cb in listeners:
            cb(name, state)

    def add_state_listener(self, callback: Callable[[str, str], None]) -> Callable[[], None]:
        """``callback(component, state)`` at every change, UpdateState included."""
        with self._cond:
            self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    def wait_for_state(self, name: str, state: str, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._states.get(name) == state, timeout)

    # -- component updates
    def update_subscribers(self) -> list[str]:
        with self._cond:
            return sorted({c for c, _ in self._update_subs.values()})

    def offer_update(self, deployment_id: str, *, is_ggc_restarting: bool = False,
                     timeout: float = 60.0) -> dict[str, Deferral]:
        """Tell subscribers an update is coming; their deferrals, by component.

        Returns as soon as every subscribed component has deferred, else after ``timeout``
        seconds (a component that does not defer accepts, as with the nucleus).
        """
        with self._cond:
            subs = list(self._update_subs.values())
            self._offers[deployment_id] = {}
        event = model.ComponentUpdatePolicyEvents(pre_update_event=model.PreComponentUpdateEvent(
            deployment_id=deployment_id, is_ggc_restarting=is_ggc_restarting))
        for _, send in subs:
            send(event)
        expected = {c for c, _ in subs}
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.wait_for(lambda: expected <= set(self._offers[deployment_id]),
                                max(0.0, deadline - time.monotonic()))
            return dict(self._offers.pop(deployment_id))

    def post_update(self, deployment_id: str) -> None:
        with self._cond:
            subs = list(self._update_subs.values())
        event = model.ComponentUpdatePolicyEvents(
            post_update_event=model.PostComponentUpdateEvent(deployment_id=deployment_id))
        for _, send in subs:
            send(event)

    # -- IPC
    def _update_state_op(self, call) -> model.UpdateStateResponse:
        state = call.request.state
        if state not in REPORTABLE:
            raise model.InvalidArgumentsError(message=f"State {state} is not one of RUNNING, ERRORED")
        self.set_state(call.component.name, state)
        return model.UpdateStateResponse()

    def _subscribe_op(self, call) -> model.SubscribeToComponentUpdatesResponse:
        stream = call.stream
        with self._cond:
            self._next += 1
            key = self._next
            self._update_subs[key] = (call.component.name, stream.send_event)

        def gone() -> None:
            with self._cond:
                self._update_subs.pop(key, None)
        stream.on_close(gone)
        return model.SubscribeToComponentUpdatesResponse()

    def _defer_op(self, call) -> model.DeferComponentUpdateResponse:
        r: model.DeferComponentUpdateRequest = call.request
        name = call.component.name
        with self._cond:
            if name not in {c for c, _ in self._update_subs.values()}:
                raise model.InvalidArgumentsError(message="Component is not subscribed to component update events")
            if r.deployment_id is None:
                raise model.InvalidArgumentsError(message="Cannot defer the update, the deployment ID provided was null")
            offer = self._offers.get(r.deployment_id)
            if offer is None:
                raise model.ServiceError(message="Time limit to respond to PreComponentUpdateEvent exceeded")
            offer[name] = Deferral(name, int(r.recheck_after_ms or 0), r.message)
            self._cond.notify_all()
        return model.DeferComponentUpdateResponse()
