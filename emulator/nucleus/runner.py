"""Component lifecycle: each component's processes and states, as the Java nucleus runs them.

One :class:`Service` per component, each with its own thread, moves through the states of
``com.aws.greengrass.lifecyclemanager.Lifecycle`` and reports every change to
``server.lifecycle`` (so ``ListComponents`` and ``UpdateState`` see the same state):

- **NEW**: ``Install`` runs (timeout 120 s by default). Exit 0 → **INSTALLED**; non-zero or
  timeout → **ERRORED** → NEW again (install retried).
- **INSTALLED**: waits until every HARD dependency is RUNNING or FINISHED (or STOPPING, when
  that stop did not follow a startup error); SOFT dependencies are never waited for, exactly as
  in the nucleus (components are only *started* in dependency order). Then **STARTING**.
- **STARTING** with a ``Startup`` step: the component becomes **RUNNING** when the startup
  script exits 0, or earlier when the component reports RUNNING over IPC (``UpdateState``); a
  non-zero exit, an ERRORED report, or no RUNNING within the startup timeout (120 s) is an
  error. The startup process may keep running: it is the component's process until shutdown.
  With a Startup step, ``Run`` is ignored (the nucleus runs Run only when there is no Startup).
- **STARTING** with a ``Run`` step: **RUNNING** as soon as the process is started. Exit 0 →
  STOPPING (the shutdown step runs) → **FINISHED**; non-zero → **ERRORED**. ``Run`` has no
  timeout unless the recipe gives one (then ERRORED when it expires).
- Neither step: **FINISHED** at once.
- **ERRORED** → **STOPPING** (the ``Shutdown`` step, 15 s, then every process of the component is
  sent SIGTERM and, after 5 s, SIGKILL) → INSTALLED → started again; an install error goes back
  to NEW. **BROKEN**: the nucleus counts errors per state the component was in (NEW, STARTING or
  RUNNING); the third error from the same state, with less than ``errorResetTime`` (one hour)
  between consecutive errors, makes it BROKEN instead, and a transition from that state to
  anything but ERRORED resets its count. A BROKEN component is stopped and not restarted until
  a deployment or ``RestartComponent``.
- Dependencies: when a HARD dependency leaves its ready states while the dependent is STARTING
  or RUNNING, the dependent is restarted (and waits for it again in INSTALLED). A SOFT
  dependency's changes never touch the dependent.

Processes run as ``sh -c <script>`` (recipe variables interpolated, see
:mod:`emulator.nucleus.recipe`), in their own process group, cwd ``<root>/work/<name>``, with
this process's environment plus ``server.environment(name)`` (the IPC socket, ``SVCUID``,
``AWS_IOT_THING_NAME``), the lifecycle's ``Setenv`` and the step's ``Setenv``. Their stdout and
stderr go, line by line, to ``<root>/logs/<name>.log``, with the state changes.
``RequiresPrivilege`` is recorded but scripts run as the nucleus's user (a local nucleus is not
root).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from emulator.nucleus import recipe as rcp
from emulator.nucleus.recipe import HARD, Recipe, Step

log = logging.getLogger("emulator.nucleus")

NEW, INSTALLED, STARTING, RUNNING = "NEW", "INSTALLED", "STARTING", "RUNNING"
STOPPING, FINISHED, ERRORED, BROKEN = "STOPPING", "FINISHED", "ERRORED", "BROKEN"
MAXIMUM_CONTINUAL_ERROR = 3
ERROR_RESET_TIME_S = 3600.0
KILL_GRACE_S = 5.0
STATES_TO_ERRORED = {NEW, STARTING, RUNNING}


@dataclass
class _Event:
    kind: str  # exit, report, restart, stop, dependency
    value: object = None
    generation: int = 0


class Layout:
    """The nucleus's folders under its root."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def artifacts(self, name: str, version: str) -> Path:
        return self.root / "packages" / "artifacts" / name / version

    def unarchived(self, name: str, version: str) -> Path:
        return self.root / "packages" / "artifacts-unarchived" / name / version

    def work(self, name: str) -> Path:
        return self.root / "work" / name

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    @property
    def nucleus_log(self) -> Path:
        return self.root / "logs" / "greengrass.log"


class ComponentLog:
    """``<root>/logs/<name>.log``: process output and state changes, one line each."""

    def __init__(self, path: Path, name: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.name = path, name
        self._lock = threading.Lock()

    def write(self, level: str, text: str, **kv: object) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"
        extra = ", ".join(f"{k}={v}" for k, v in kv.items())
        line = f"{stamp} [{level}] {self.name}: {text}" + (f" {{{extra}}}" if extra else "") + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line)


class Service:
    """One component: its processes and its state machine (see the module doc)."""

    def __init__(self, runner: Runner, recipe: Recipe) -> None:
        self.runner = runner
        self.recipe = recipe
        self.name = recipe.name
        self.state = NEW
        self.status_reason = ""
        self._events: queue.Queue[_Event] = queue.Queue()
        self._generation = 0
        self._procs: list[subprocess.Popen] = []
        self._errors: dict[str, list[float]] = {}
        self._startup_errored = False
        self._installed = False
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self.log = ComponentLog(runner.layout.log(self.name), self.name)

    # -- control (any thread)
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=f"service-{self.name}", daemon=True)
        self._thread.start()

    def request_restart(self) -> None:
        self._events.put(_Event("restart"))

    def request_stop(self) -> None:
        self._events.put(_Event("stop"))

    def join(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def reported(self, state: str) -> None:
        """A state set from outside (UpdateState over IPC)."""
        self._events.put(_Event("report", state))

    def dependency_changed(self) -> None:
        self._events.put(_Event("dependency"))

    @property
    def didStartupError(self) -> bool:  # noqa: N802 - the nucleus's name
        return self._startup_errored

    # -- state
    def _set(self, state: str, reason: str = "") -> None:
        old = self.state
        if old == state:
            return
        if state == ERRORED and old in STATES_TO_ERRORED:
            now = self.runner.clock()
            errors = self._errors.setdefault(old, [])
            if errors and now - errors[-1] >= ERROR_RESET_TIME_S:
                errors.clear()
            errors.append(now)
            if len(errors) >= MAXIMUM_CONTINUAL_ERROR:
                state = BROKEN
        elif state != ERRORED:
            self._errors.pop(old, None)
        self.state = state
        self.status_reason = reason
        self.log.write("INFO", "service-set-state", serviceName=self.name, currentState=old, newState=state,
                       **({"reason": reason} if reason else {}))
        log.info("%s: %s -> %s%s", self.name, old, state, f" ({reason})" if reason else "")
        self.runner._state_changed(self, state)

    # -- processes
    def _spawn(self, step_name: str, step: Step) -> subprocess.Popen:
        ctx = self.runner.context(self.name)
        deps = {d: self.runner.context(d) for d in self.recipe.dependencies if self.runner.has(d)}
        script = rcp.interpolate(step.script, ctx, deps)
        env = dict(os.environ)
        env.update(self.runner.environment(self.name))
        for k, v in {**self.recipe.setenv, **step.setenv}.items():
            env[k] = rcp.interpolate(v, ctx, deps)
        work = self.runner.layout.work(self.name)
        work.mkdir(parents=True, exist_ok=True)
        self.log.write("INFO", f"shell-runner-start. {script!r}",
                       scriptName=f"services.{self.name}.lifecycle.{step_name.capitalize()}",
                       requiresPrivilege=str(step.requires_privilege).lower())
        proc = subprocess.Popen(["sh", "-c", script], cwd=work, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self._procs.append(proc)
        for stream, label in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
            threading.Thread(target=self._copy, args=(stream, label, step_name), daemon=True,
                             name=f"copier-{self.name}-{label}").start()
        return proc

    def _copy(self, stream, label: str, step_name: str) -> None:
        script = f"services.{self.name}.lifecycle.{step_name.capitalize()}"
        for raw in iter(stream.readline, b""):
            self.log.write("INFO" if label == "stdout" else "WARN",
                           f"{label}. {raw.decode(errors='replace').rstrip()}", scriptName=script,
                           serviceName=self.name, currentComponentState=self.state)
        stream.close()

    def _watch(self, proc: subprocess.Popen, kind: str) -> None:
        gen = self._generation

        def wait() -> None:
            code = proc.wait()
            self._events.put(_Event("exit", (kind, code), gen))
        threading.Thread(target=wait, daemon=True, name=f"wait-{self.name}-{kind}").start()

    def _run_blocking(self, step_name: str) -> tuple[bool, str]:
        """Run a step to its end (install, shutdown); (ok, reason). A stop request is kept."""
        step = self.recipe.steps.get(step_name)
        if step is None:
            return True, ""
        proc = self._spawn(step_name, step)
        try:
            code = proc.wait(step.timeout)
        except subprocess.TimeoutExpired:
            self._kill([proc])
            return False, f"{step_name} timed out after {step.timeout:g} s"
        self.log.write("INFO", f"{step_name.capitalize()} script exited", exitCode=code)
        self._procs.remove(proc)
        return code == 0, "" if code == 0 else f"{step_name} exited with code {code}"

    def _kill(self, procs: list[subprocess.Popen]) -> None:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + KILL_GRACE_S
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        for p in procs:
            if p in self._procs:
                self._procs.remove(p)

    def _stop_processes(self) -> None:
        """STOPPING: the shutdown step, then every process left."""
        self._generation += 1  # exits from here on are ours, not the component's
        if "shutdown" in self.recipe.steps:
            ok, reason = self._run_blocking("shutdown")
            if not ok:
                self.log.write("WARN", f"shutdown step failed: {reason}")
        self._kill(list(self._procs))

    # -- the state machine (its own thread)
    def _next(self, timeout: float | None) -> _Event | None:
        try:
            return self._events.get(timeout=None if timeout is None else max(0.0, timeout))
        except queue.Empty:
            return None

    def _main(self) -> None:
        try:
            self.runner._state_changed(self, self.state)
            self._loop()
        except Exception:
            log.exception("%s: the lifecycle thread failed", self.name)
            self.log.write("ERROR", "the lifecycle thread failed (see greengrass.log)")
        finally:
            self._stopped.set()

    def _error(self, reason: str) -> None:
        """ERRORED (or BROKEN), then stop the processes; returns the state to go on from."""
        prev = self.state
        if prev == STARTING:
            self._startup_errored = True
        self._set(ERRORED, reason)
        if self.state == BROKEN:
            self._stop_processes()
            return
        if prev in (STARTING, RUNNING):
            self._set(STOPPING)
            self._stop_processes()
            self._set(INSTALLED)
        elif prev == NEW:
            self._kill(list(self._procs))
            self._set(NEW)

    def _loop(self) -> None:
        while True:
            state = self.state
            if state == NEW:
                if self._drain_stop():
                    return self._finish()
                ok, reason = self._run_blocking("install")
                if self._drain_stop():
                    return self._finish()
                if ok:
                    self._set(INSTALLED)
                else:
                    self._error(f"install: {reason}")
            elif state == INSTALLED:
                while not self.runner.dependencies_ready(self):
                    ev = self._next(None)
                    if ev.kind == "stop":
                        return self._finish()
                self._drain(keep=("stop",))
                if self._drain_stop():
                    return self._finish()
                self._set(STARTING)
                self._startup_errored = False
                self._starting()
            elif state in (RUNNING, STARTING):
                try:
                    self._running()
                except _Stopped:
                    return
            elif state in (BROKEN, FINISHED):
                ev = self._next(None)
                if ev.kind == "stop":
                    return self._finish()
                if ev.kind == "restart":
                    self._errors.clear()
                    self._set(INSTALLED)
            elif state == ERRORED:  # an ERRORED report handled elsewhere; go on as after an error
                self._set(INSTALLED)
            else:
                return

    def _drain(self, keep: tuple[str, ...]) -> None:
        kept = []
        while True:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                break
            if ev.kind in keep:
                kept.append(ev)
        for ev in kept:
            self._events.put(ev)

    def _drain_stop(self) -> bool:
        stop = False
        kept = []
        while True:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                break
            if ev.kind == "stop":
                stop = True
            else:
                kept.append(ev)
        for ev in kept:
            self._events.put(ev)
        return stop

    def _finish(self) -> None:
        """Stop for good (the nucleus stopping, or the component removed or replaced)."""
        if self.state in (STARTING, RUNNING, ERRORED):
            self._set(STOPPING)
            self._stop_processes()
        else:
            self._kill(list(self._procs))
        self._set(FINISHED)

    def _starting(self) -> None:
        self._generation += 1
        startup = self.recipe.steps.get("startup")
        run = self.recipe.steps.get("run")
        self._deadline = None
        if startup is not None:
            self._watch(self._spawn("startup", startup), "startup")
            self._deadline = None if startup.timeout is None else time.monotonic() + startup.timeout
            self._timeout_reason = f"startup timed out after {startup.timeout:g} s"
        elif run is not None:
            self._watch(self._spawn("run", run), "run")
            self._set(RUNNING)
            self._deadline = None if run.timeout is None else time.monotonic() + run.timeout
            self._timeout_reason = f"run timed out after {run.timeout:g} s" if run.timeout else ""
        else:
            self._set(FINISHED, "nothing to run")

    def _running(self) -> None:
        """Wait in STARTING/RUNNING for the next thing that happens to the component."""
        gen = self._generation
        timeout = None if self._deadline is None else self._deadline - time.monotonic()
        ev = self._next(timeout)
        if ev is None:
            self._deadline = None
            self._error(self._timeout_reason)
            return
        if ev.kind == "stop":
            self._finish()
            raise _Stopped
        if ev.kind == "restart":
            self._set(STOPPING, "restart requested")
            self._stop_processes()
            self._set(INSTALLED)
        elif ev.kind == "report":
            if ev.value == RUNNING and self.state == STARTING:
                self._deadline = None
                self._set(RUNNING, "reported over IPC")
            elif ev.value == ERRORED:
                self._error("reported ERRORED over IPC")
        elif ev.kind == "dependency":
            if not self.runner.dependencies_ready(self):
                self._set(STOPPING, "a HARD dependency is not running")
                self._stop_processes()
                self._set(INSTALLED)
        elif ev.kind == "exit" and ev.generation == gen:
            kind, code = ev.value  # type: ignore[misc]
            self.log.write("INFO", f"{kind.capitalize()} script exited", exitCode=code)
            if kind == "startup":
                if code == 0 and self.state == STARTING:
                    self._deadline = None
                    self._set(RUNNING)
                elif code != 0:
                    self._error(f"startup exited with code {code}")
            elif kind == "run":
                if code == 0:
                    self._deadline = None
                    self._set(STOPPING, "run finished")
                    self._stop_processes()
                    self._set(FINISHED)
                else:
                    self._error(f"run exited with code {code}")


class _Stopped(Exception):
    pass


class Runner:
    """Every component's :class:`Service`, their variables and their dependency links.

    ``register(recipe, configuration)`` is done by the deployment side; :meth:`start` and
    :meth:`stop` start and stop services; :meth:`add_state_listener` sees every state change.
    """

    def __init__(self, server, layout: Layout, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.server = server
        self.layout = layout
        self.clock = clock
        self.services: dict[str, Service] = {}
        self._lock = threading.RLock()
        self._listeners: list[Callable[[str, str], None]] = []
        server.lifecycle.add_state_listener(self._lifecycle_changed)

    # -- variables
    def has(self, name: str) -> bool:
        return name in self.services

    def context(self, name: str) -> rcp.Context:
        r = self.services[name].recipe
        try:
            config = self.server.config.get(name)
        except KeyError:
            config = {}
        return rcp.Context(name, self.layout.artifacts(name, r.version), self.layout.unarchived(name, r.version),
                           self.layout.work(name), self.layout.root, self.server.thing_name, config)

    def environment(self, name: str) -> dict[str, str]:
        env = dict(self.server.environment(name))
        env.setdefault("AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH", env.get("AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT", ""))
        env["GG_ROOT_CA_PATH"] = str(self.layout.root / "rootCA.pem")
        env["AWS_REGION"] = os.environ.get("AWS_REGION", "us-east-1")
        env["AWS_CONTAINER_AUTHORIZATION_TOKEN"] = env.get("SVCUID", "")
        return env

    # -- services
    def service(self, name: str) -> Service | None:
        with self._lock:
            return self.services.get(name)

    def add(self, recipe: Recipe) -> Service:
        """Make (not start) the service for a component; replaces a stopped one of that name."""
        with self._lock:
            service = Service(self, recipe)
            self.services[recipe.name] = service
            return service

    def remove(self, name: str, timeout: float = 60.0) -> None:
        """Stop a component (its shutdown step runs) and forget it."""
        service = self.service(name)
        if service is None:
            return
        self.stop_service(service, timeout)
        with self._lock:
            if self.services.get(name) is service:
                del self.services[name]

    def stop_service(self, service: Service, timeout: float = 60.0) -> None:
        if service._thread is None:
            return
        service.request_stop()
        if not service.join(timeout):
            log.error("%s did not stop within %g s", service.name, timeout)

    def start_all(self, names: list[str] | None = None) -> None:
        """Start services in dependency order (dependencies first)."""
        for name in self.order(names):
            s = self.services[name]
            if s._thread is None:
                s.start()

    def order(self, names: list[str] | None = None) -> list[str]:
        with self._lock:
            names = list(self.services) if names is None else list(names)
            out: list[str] = []
            seen: set[str] = set()

            def visit(n: str, path: tuple[str, ...]) -> None:
                if n in seen or n not in self.services:
                    return
                if n in path:
                    raise ValueError(f"dependency cycle: {' -> '.join(path + (n,))}")
                for d in sorted(self.services[n].recipe.dependencies):
                    visit(d, path + (n,))
                seen.add(n)
                out.append(n)
            for n in sorted(names):
                visit(n, ())
            return out

    def stop_all(self, timeout: float = 60.0) -> None:
        """Stop every component, dependents before what they depend on."""
        for name in reversed(self.order()):
            s = self.service(name)
            if s is not None:
                self.stop_service(s, timeout)

    # -- dependencies and states
    def _ready(self, name: str) -> bool:
        s = self.service(name)
        if s is None:
            return True  # not a component here (aws.greengrass.Nucleus): always there
        return s.state in (RUNNING, FINISHED) or (s.state == STOPPING and not s.didStartupError)

    def dependencies_ready(self, service: Service) -> bool:
        return all(self._ready(d) for d, dep in service.recipe.dependencies.items() if dep.type == HARD)

    def add_state_listener(self, callback: Callable[[str, str], None]) -> Callable[[], None]:
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    def _state_changed(self, service: Service, state: str) -> None:
        self.server.lifecycle.set_state(service.name, state)
        for cb in list(self._listeners):
            cb(service.name, state)
        with self._lock:
            others = [s for s in self.services.values() if service.name in s.recipe.dependencies]
        for s in others:
            s.dependency_changed()

    def _lifecycle_changed(self, name: str, state: str) -> None:
        s = self.service(name)
        if s is not None and state != s.state:
            s.reported(state)  # UpdateState over IPC


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
