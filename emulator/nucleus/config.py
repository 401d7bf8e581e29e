"""The configuration store: each component's configuration, its updates, watchers and validators.

As in the nucleus's ConfigStore IPC service:

- ``GetConfiguration`` reads any component's configuration (no authorization): the whole of it,
  or the node at ``keyPath``; a leaf comes back as ``{leafName: value}``. A missing component or
  key is ``ResourceNotFoundError`` "Key not found".
- ``UpdateConfiguration`` merges ``valueToMerge`` into the caller's own configuration at
  ``keyPath`` (the container to merge into). Each leaf remembers when it was written; a
  ``timestamp`` older than a leaf it would change is ``FailedUpdateConditionCheckError`` (and
  nothing is written). ``accessControl`` cannot be changed this way (``InvalidArgumentsError``).
- ``SubscribeToConfigurationUpdate`` (a component's own, or another's, at an existing keyPath)
  streams one ``ConfigurationUpdateEvents`` for each changed leaf at or under that path, with the
  leaf's key path.
- ``SubscribeToValidateConfigurationUpdates`` makes the caller the validator of its own
  configuration (one per component); :meth:`ConfigStore.validate` (a deployment, from the
  runner) sends it the proposed configuration and waits for its ``SendConfigurationValidityReport``.

The runner changes configurations with :meth:`ConfigStore.merge` and :meth:`ConfigStore.replace`;
both notify the watchers as an IPC update does.
"""

from __future__ import annotations

import concurrent.futures
import copy
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from awsiot.greengrasscoreipc import model

KEY_NOT_FOUND = "Key not found"
RESTRICTED = ["accessControl"]

Path = tuple[str, ...]


@dataclass(frozen=True)
class ValidityReport:
    status: str  # "ACCEPTED" or "REJECTED"
    message: str | None = None


def _leaves(value: Any, prefix: Path = ()) -> dict[Path, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[Path, Any] = {}
        for k, v in value.items():
            out.update(_leaves(v, prefix + (str(k),)))
        return out
    return {prefix: value}


def _find(config: Any, path: Path) -> tuple[bool, Any]:
    node = config
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return False, None
        node = node[key]
    return True, node


def _merge(target: dict, value: Mapping) -> None:
    for k, v in value.items():
        if isinstance(v, Mapping) and isinstance(target.get(k), dict):
            _merge(target[k], v)
        else:
            target[k] = copy.deepcopy(dict(v)) if isinstance(v, Mapping) else copy.deepcopy(v)


class ConfigStore:
    def __init__(self) -> None:
        self._configs: dict[str, dict] = {}
        self._modtimes: dict[str, dict[Path, int]] = {}
        self._watchers: dict[int, tuple[str, Path, Callable[[str, Path], None]]] = {}
        self._validators: dict[str, Callable[[str, dict], None]] = {}
        self._reports: dict[tuple[str, str], concurrent.futures.Future] = {}
        self._next = 0
        self._lock = threading.RLock()

    def operations(self) -> dict:
        from emulator.nucleus.ipc import Operation
        return {
            "aws.greengrass#GetConfiguration": Operation(self._get_op),
            "aws.greengrass#UpdateConfiguration": Operation(self._update_op),
            "aws.greengrass#SubscribeToConfigurationUpdate": Operation(self._subscribe_op),
            "aws.greengrass#SubscribeToValidateConfigurationUpdates": Operation(self._validate_subscribe_op),
            "aws.greengrass#SendConfigurationValidityReport": Operation(self._report_op),
        }

    # -- Python API
    def set_component(self, name: str, configuration: Mapping) -> None:
        """A component's configuration at registration (no events)."""
        now = int(time.time() * 1000)
        with self._lock:
            self._configs[name] = copy.deepcopy(dict(configuration))
            self._modtimes[name] = {p: now for p in _leaves(self._configs[name])}

    def get(self, name: str, key_path: list[str] | tuple[str, ...] = ()) -> Any:
        """A deep copy of the value at ``key_path``; KeyError naming the path when absent."""
        with self._lock:
            if name not in self._configs:
                raise KeyError(f"no component {name}")
            found, node = _find(self._configs[name], tuple(key_path))
            if not found:
                raise KeyError(f"{name}: no configuration key {'/'.join(key_path)}")
            return copy.deepcopy(node)

    def merge(self, name: str, key_path: list[str] | tuple[str, ...], value: Mapping,
              timestamp_ms: int | None = None) -> list[Path]:
        """Merge ``value`` at ``key_path``; the changed leaves' paths (watchers are told)."""
        ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        path = tuple(key_path)
        with self._lock:
            config = self._configs.setdefault(name, {})
            modtimes = self._modtimes.setdefault(name, {})
            before = _leaves(config)
            proposed = {path + p: v for p, v in _leaves(dict(value)).items()} if value else {}
            stale = [p for p, v in proposed.items() if modtimes.get(p, -1) > ts and before.get(p, object()) != v]
            if stale:
                raise model.FailedUpdateConditionCheckError(
                    message="Proposed timestamp is older than the config's latest modified timestamp")
            node = config
            for key in path:
                if not isinstance(node.get(key), dict):
                    node[key] = {}
                node = node[key]
            _merge(node, value)
            changed = self._changed(name, before)
            for p in changed:
                modtimes[p] = ts
        self._notify(name, changed)
        return changed

    def replace(self, name: str, configuration: Mapping) -> list[Path]:
        """Replace a component's whole configuration (a deployment's reset); the changed paths."""
        now = int(time.time() * 1000)
        with self._lock:
            before = _leaves(self._configs.get(name, {}))
            self._configs[name] = copy.deepcopy(dict(configuration))
            changed = self._changed(name, before)
            modtimes = self._modtimes.setdefault(name, {})
            for p in changed:
                modtimes[p] = now
        self._notify(name, changed)
        return changed

    def subscribe(self, name: str, key_path: list[str] | tuple[str, ...],
                  callback: Callable[[str, Path], None]) -> Callable[[], None]:
        """Call ``callback(component, changed_key_path)`` for changes at or under ``key_path``."""
        with self._lock:
            self._next += 1
            key = self._next
            self._watchers[key] = (name, tuple(key_path), callback)
        return lambda: self._watchers.pop(key, None)

    def has_validator(self, name: str) -> bool:
        with self._lock:
            return name in self._validators

    def validate(self, name: str, configuration: Mapping, deployment_id: str,
                 timeout: float = 30.0) -> ValidityReport | None:
        """Ask ``name``'s validator about ``configuration``; its report, or None.

        None means no validator is subscribed or none answered within ``timeout`` seconds (the
        nucleus then goes on with the deployment). Call from any thread but the server's.
        """
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            validator = self._validators.get(name)
            if validator is None:
                return None
            self._reports[(name, deployment_id)] = fut
        validator(deployment_id, copy.deepcopy(dict(configuration)))
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            return None
        finally:
            with self._lock:
                self._reports.pop((name, deployment_id), None)

    # -- internals
    def _changed(self, name: str, before: dict[Path, Any]) -> list[Path]:
        after = _leaves(self._configs[name])
        missing = object()
        return [p for p in {**before, **after} if before.get(p, missing) != after.get(p, missing)]

    def _notify(self, name: str, changed: list[Path]) -> None:
        if not changed:
            return
        with self._lock:
            watchers = [(path, cb) for comp, path, cb in self._watchers.values() if comp == name]
        for path, cb in watchers:
            for p in changed:
                if p[:len(path)] == path or path[:len(p)] == p:
                    cb(name, p)

    # -- IPC
    def _get_op(self, call) -> model.GetConfigurationResponse:
        r: model.GetConfigurationRequest = call.request
        name = r.component_name or call.component.name
        path = tuple(r.key_path or ())
        with self._lock:
            if name not in self._configs:
                raise model.ResourceNotFoundError(message=KEY_NOT_FOUND)
            found, node = _find(self._configs[name], path)
            if not found:
                raise model.ResourceNotFoundError(message=KEY_NOT_FOUND)
            value = copy.deepcopy(node) if isinstance(node, Mapping) else {path[-1]: node}
        return model.GetConfigurationResponse(component_name=name, value=value)

    def _update_op(self, call) -> model.UpdateConfigurationResponse:
        r: model.UpdateConfigurationRequest = call.request
        if r.timestamp is None:
            raise model.InvalidArgumentsError(message="Timestamp is required")
        if r.value_to_merge is None:
            raise model.InvalidArgumentsError(message="ValueToMerge is required")
        path = tuple(r.key_path or ())
        if (not path and any(k in RESTRICTED for k in r.value_to_merge)) or (path and path[0] in RESTRICTED):
            raise model.InvalidArgumentsError(
                message=f"Config update is not allowed for following fields {RESTRICTED}")
        self.merge(call.component.name, path, r.value_to_merge, int(r.timestamp.timestamp() * 1000))
        return model.UpdateConfigurationResponse()

    def _subscribe_op(self, call) -> model.SubscribeToConfigurationUpdateResponse:
        r: model.SubscribeToConfigurationUpdateRequest = call.request
        name = r.component_name or call.component.name
        path = tuple(r.key_path or ())
        with self._lock:
            if name not in self._configs or not _find(self._configs[name], path)[0]:
                raise model.ResourceNotFoundError(message=KEY_NOT_FOUND)
        stream = call.stream

        def tell(component: str, changed: Path) -> None:
            stream.send_event(model.ConfigurationUpdateEvents(
                configuration_update_event=model.ConfigurationUpdateEvent(
                    component_name=component, key_path=list(changed))))

        stream.on_close(self.subscribe(name, path, tell))
        return model.SubscribeToConfigurationUpdateResponse()

    def _validate_subscribe_op(self, call) -> model.SubscribeToValidateConfigurationUpdatesResponse:
        name = call.component.name
        stream = call.stream

        def ask(deployment_id: str, configuration: dict) -> None:
            stream.send_event(model.ValidateConfigurationUpdateEvents(
                validate_configuration_update_event=model.ValidateConfigurationUpdateEvent(
                    configuration=configuration, deployment_id=deployment_id)))

        with self._lock:
            self._validators.setdefault(name, ask)

        def gone() -> None:
            with self._lock:
                if self._validators.get(name) is ask:
                    del self._validators[name]
        stream.on_close(gone)
        return model.SubscribeToValidateConfigurationUpdatesResponse()

    def _report_op(self, call) -> model.SendConfigurationValidityReportResponse:
        r: model.SendConfigurationValidityReportRequest = call.request
        report = r.configuration_validity_report
        if report is None or report.deployment_id is None:
            raise model.InvalidArgumentsError(
                message="Cannot accept configuration validity report, the deployment ID provided was null")
        with self._lock:
            fut = self._reports.pop((call.component.name, report.deployment_id), None)
        if fut is None:
            raise model.InvalidArgumentsError(message="Validation request either timed out or was never made")
        if not fut.done():
            fut.set_result(ValidityReport(report.status, report.message))
        return model.SendConfigurationValidityReportResponse()
