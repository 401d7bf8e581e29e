"""Local deployments through ``gateway nucleus``'s greengrass-cli verbs, against a real nucleus.

The nucleus runs in a fixture; each verb runs as ``python -m gateway.cli nucleus ...`` in its own
process and reaches it over IPC with the awsiotsdk client and the CLI token, as greengrass-cli
does. The test component is a real IPC client: it validates configurations (rejecting
``bad``), watches its configuration, and defers the first offer of each deployment.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from emulator.nucleus.kernel import Nucleus
from emulator.nucleus.runner import wait_for
from nucleus_helpers import PY, Project, lines, remove, short_dir, wait_lines

REPO = Path(__file__).resolve().parents[1]
THING = "meter-gw-test"
NAME = "t.Agent"

AGENT = '''
import os, threading
from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
from awsiot.greengrasscoreipc.model import ConfigurationValidityReport as Report

ipc = GreengrassCoreIPCClientV2()
out = open("events.log", "a", buffering=1)
offers = {}

def validate(ev):
    e = ev.validate_configuration_update_event
    bad = e.configuration.get("bad")
    out.write(f"validate {sorted(e.configuration)}\\n")
    ipc.send_configuration_validity_report(configuration_validity_report=Report(
        status="REJECTED" if bad else "ACCEPTED", deployment_id=e.deployment_id,
        message=f"bad must not be set, got {bad!r}" if bad else "ok"))

def update(ev):
    if ev.pre_update_event is not None:
        d = ev.pre_update_event.deployment_id
        offers[d] = offers.get(d, 0) + 1
        wait = 300 if offers[d] == 1 else 0
        out.write(f"offer {offers[d]} defer {wait}\\n")
        ipc.defer_component_update(deployment_id=d, recheck_after_ms=wait, message="busy" if wait else None)

def changed(ev):
    out.write("config " + "/".join(ev.configuration_update_event.key_path) + "\\n")

ipc.subscribe_to_validate_configuration_updates(on_stream_event=validate)
ipc.subscribe_to_component_updates(on_stream_event=update)
ipc.subscribe_to_configuration_update(key_path=[], on_stream_event=changed)
out.write(f"start {os.getpid()}\\n")
ipc.update_state(state="RUNNING")
threading.Event().wait()
'''


@pytest.fixture
def base():
    d = short_dir()
    yield d
    remove(d)


@pytest.fixture
def project(base) -> Project:
    p = Project(base / "src")
    for version in ("1.0.0", "2.0.0"):
        p.component(NAME, version, files={"agent.py": AGENT},
                    config={"greeting": "hello", "limits": {"a": 1, "b": 2}, "version": version},
                    lifecycle={"Startup": {"Script": f"exec {PY} {{artifacts:path}}/agent.py", "Timeout": 30}})
    return p


@pytest.fixture
def nucleus(base):
    with Nucleus(base / "root", THING, offer_timeout=10, validate_timeout=10) as n:
        yield n


def cli(*args: str, ok: bool = True) -> str:
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "nucleus", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def create(nucleus: Nucleus, project: Project, *args: str, ok: bool = True) -> str:
    out = cli("deployment", "create", "--root", str(nucleus.root), "--recipeDir", str(project.recipes),
              "--artifactDir", str(project.artifacts), *args, "--wait", "60", ok=ok)
    return re.search(r"Deployment Id: (\S+)", out).group(1)


def status(nucleus: Nucleus, deployment_id: str) -> str:
    return cli("deployment", "status", "--root", str(nucleus.root), deployment_id)


def events(nucleus: Nucleus) -> Path:
    return nucleus.root / "work" / NAME / "events.log"


def listed(nucleus: Nucleus) -> dict:
    out = cli("component", "list", "--root", str(nucleus.root))
    m = re.search(rf"Component Name: {re.escape(NAME)}\n    Version: (\S+)\n    State: (\S+)\n"
                  r"    Configuration: (.*)\n", out)
    assert m, out
    return {"version": m.group(1), "state": m.group(2), "configuration": json.loads(m.group(3))}


def test_merge_then_reset_through_the_cli_reconfigures_without_a_restart(nucleus, project):
    d = create(nucleus, project, "--merge", f"{NAME}=1.0.0")
    assert f"{d}: SUCCEEDED" in status(nucleus, d)
    got = listed(nucleus)
    assert (got["version"], got["state"]) == ("1.0.0", "RUNNING")
    assert got["configuration"] == {"greeting": "hello", "limits": {"a": 1, "b": 2}, "version": "1.0.0"}
    start = [x for x in lines(events(nucleus)) if x.startswith("start")]

    update = json.dumps({NAME: {"MERGE": {"greeting": "bonjour", "limits": {"b": 20, "c": 30}}}})
    d = create(nucleus, project, "--update-config", update)
    assert f"{d}: SUCCEEDED" in status(nucleus, d)
    assert listed(nucleus)["configuration"] == {"greeting": "bonjour", "limits": {"a": 1, "b": 20, "c": 30},
                                                "version": "1.0.0"}
    ev = wait_lines(events(nucleus), lambda ls: {"config greeting", "config limits/b", "config limits/c"} <= set(ls))
    assert "validate ['greeting', 'limits', 'version']" in ev

    reset = project.recipes.parent / "reset.json"
    reset.write_text(json.dumps({NAME: {"RESET": ["/limits/c", "/greeting"], "MERGE": {"limits": {"a": 5}}}}))
    d = create(nucleus, project, "--update-config", str(reset))
    assert f"{d}: SUCCEEDED" in status(nucleus, d)
    assert listed(nucleus)["configuration"] == {"greeting": "hello", "limits": {"a": 5, "b": 20}, "version": "1.0.0"}
    d = create(nucleus, project, "--update-config", json.dumps({NAME: {"RESET": [""]}}))
    assert listed(nucleus)["configuration"] == {"greeting": "hello", "limits": {"a": 1, "b": 2}, "version": "1.0.0"}
    # configuration-only changes never restarted the process
    assert [x for x in lines(events(nucleus)) if x.startswith("start")] == start
    assert nucleus.runner.service(NAME).state == "RUNNING"


def test_a_rejected_configuration_fails_the_deployment_with_the_components_message(nucleus, project):
    create(nucleus, project, "--merge", f"{NAME}=1.0.0")
    d = create(nucleus, project, "--update-config", json.dumps({NAME: {"MERGE": {"bad": 7}}}), ok=False)
    out = status(nucleus, d)
    assert f"{d}: FAILED" in out
    assert ("Failure cause: Components reported that their to-be-deployed configuration is invalid "
            f"{{ name = {NAME}, message = bad must not be set, got 7 }}") in out
    assert "bad" not in listed(nucleus)["configuration"]
    assert not any(x.startswith("config") for x in lines(events(nucleus)))


def test_a_deferral_is_honoured_and_a_new_version_replaces_the_process(nucleus, project):
    create(nucleus, project, "--merge", f"{NAME}=1.0.0")
    first = wait_lines(events(nucleus), lambda ls: any(x.startswith("start") for x in ls))
    d = create(nucleus, project, "--merge", f"{NAME}=2.0.0")
    assert f"{d}: SUCCEEDED" in status(nucleus, d)
    ev = lines(events(nucleus))
    assert ev[ev.index("offer 1 defer 300"):ev.index("offer 1 defer 300") + 2] == ["offer 1 defer 300",
                                                                                   "offer 2 defer 0"]
    assert nucleus.deployer.record(d).deferrals == [f"{NAME} deferred the update by 300 ms: busy"]
    got = listed(nucleus)
    assert (got["version"], got["state"], got["configuration"]["version"]) == ("2.0.0", "RUNNING", "1.0.0")
    starts = [x for x in ev if x.startswith("start")]
    assert len(starts) == 2 and starts[0] == [x for x in first if x.startswith("start")][0]


def test_restart_remove_and_logs_verbs(nucleus, project):
    create(nucleus, project, "--merge", f"{NAME}=1.0.0")
    out = cli("component", "restart", "--root", str(nucleus.root), NAME)
    assert f"{NAME}: restart SUCCEEDED" in out
    wait_lines(events(nucleus), lambda ls: sum(x.startswith("start") for x in ls) == 2)
    assert wait_for(lambda: nucleus.runner.service(NAME).state == "RUNNING", 20)
    assert "newState=RUNNING" in cli("logs", "--root", str(nucleus.root), NAME)
    assert "nucleus started" in cli("logs", "--root", str(nucleus.root))
    d = create(nucleus, project, "--remove", NAME)
    assert f"{d}: SUCCEEDED" in status(nucleus, d)
    assert NAME not in cli("component", "list", "--root", str(nucleus.root))
    assert "ResourceNotFoundError" in cli("component", "restart", "--root", str(nucleus.root), NAME, ok=False)


def test_a_missing_version_fails_with_what_is_available(nucleus, project):
    d = create(nucleus, project, "--merge", f"{NAME}=9.9.9", ok=False)
    assert f"no recipe for {NAME} 9.9.9 in the recipe directory or the component store" in status(nucleus, d)


def test_the_cli_says_when_no_nucleus_runs(base):
    out = cli("component", "list", "--root", str(base / "nothing"), ok=False)
    assert "no nucleus is running on" in out


def test_gateway_nucleus_in_the_foreground_stops_components_with_their_shutdown_on_sigterm(base, project):
    import signal

    root = base / "fg"
    project.component("t.Fg", lifecycle={"Run": f"exec {PY} -c 'import time; time.sleep(600)'",
                                         "Shutdown": "echo bye > shutdown.txt"})
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "nucleus", "--root", str(root), "--thing", THING],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: (root / "cli" / "token").exists() and (root / "ipc.socket").exists(), 20)
        out = cli("deployment", "create", "--root", str(root), "--recipeDir", str(project.recipes),
                  "--artifactDir", str(project.artifacts), "--merge", "t.Fg=1.0.0", "--wait", "30")
        assert "SUCCEEDED" in out
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (root / "work" / "t.Fg" / "shutdown.txt").read_text() == "bye\n"
    assert "stopping every component" in proc.stdout.read()
    assert "t.Fg: RUNNING -> STOPPING" in (root / "logs" / "greengrass.log").read_text()
