"""The local nucleus's component runner: recipes, interpolation, lifecycle states, dependencies, logs.

Each test deploys small recipes of its own (``sh``/``python -c`` scripts) to a real
:class:`emulator.nucleus.kernel.Nucleus` and waits on states or files, never on a sleep.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from emulator.nucleus import recipe as rcp
from emulator.nucleus.kernel import Nucleus
from emulator.nucleus.runner import wait_for
from nucleus_helpers import PY, Project, lines, remove, short_dir, wait_lines

THING = "meter-gw-test"


@pytest.fixture
def base():
    d = short_dir()
    yield d
    remove(d)


@pytest.fixture
def project(base) -> Project:
    return Project(base / "src")


@pytest.fixture
def nucleus(base):
    n = Nucleus(base / "root", THING, offer_timeout=5, validate_timeout=5)
    n.start()
    history: list[tuple[str, str]] = []
    n.runner.add_state_listener(lambda c, s: history.append((c, s)))
    n.history = history
    yield n
    n.stop()


def deploy(nucleus: Nucleus, project: Project, add: dict, *, config: dict | None = None, timeout: float = 30):
    d = nucleus.deployer.submit({"add": add, "remove": [], "configuration": config or {},
                                 "recipe_dir": str(project.recipes), "artifact_dir": str(project.artifacts)})
    rec = nucleus.deployer.wait(d, timeout)
    assert rec.status in ("SUCCEEDED", "FAILED"), rec
    return rec


def states(nucleus: Nucleus, name: str) -> list[str]:
    return [s for c, s in nucleus.history if c == name]


def test_recipe_keys_are_case_insensitive_and_the_linux_manifest_is_chosen(project):
    project.component("a.B", lifecycle={"run": {"SCRIPT": "true", "timeout": 7}, "SetEnv": {"X": "1"}},
                      config={"MixedCase": {"Key": 1}})
    r = rcp.load(project.recipes / "a.B-1.0.0.json")
    assert (r.name, r.version) == ("a.B", "1.0.0")
    assert r.steps["run"] == rcp.Step("true", 7.0)
    assert r.setenv == {"X": "1"}
    assert r.default_configuration == {"MixedCase": {"Key": 1}}


def test_default_timeouts_are_the_nucleus_ones():
    r = rcp.parse({"ComponentName": "x", "ComponentVersion": "1.0.0", "Manifests": [
        {"Lifecycle": {"Install": "a", "Startup": "b", "Shutdown": "c", "Run": "d"}}]})
    assert {k: s.timeout for k, s in r.steps.items()} == {"install": 120.0, "startup": 120.0,
                                                          "shutdown": 15.0, "run": None}


def test_a_recipe_without_a_name_is_refused_with_the_file_named(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("ComponentVersion: 1.0.0\n")
    with pytest.raises(rcp.RecipeError, match=r"r\.yaml: ComponentName is missing$"):
        rcp.load(p)


def test_interpolate_every_variable():
    own = rcp.Context("me", Path("/r/a/me/1"), Path("/r/u/me/1"), Path("/r/w/me"), Path("/r"), "thing-1",
                      {"a": {"b": "x", "n": 3, "l": [1, 2]}, "t": True})
    dep = rcp.Context("dep", Path("/r/a/dep/2"), Path("/r/u/dep/2"), Path("/r/w/dep"), Path("/r"), "thing-1",
                      {"port": 8080})
    text = ("{artifacts:path}|{artifacts:decompressedPath}|{configuration:/a/b}|{configuration:/a/n}|"
            "{configuration:/a/l}|{configuration:/t}|{configuration:/missing}|{work:path}|{kernel:rootPath}|"
            "{iot:thingName}|{dep:artifacts:path}|{dep:artifacts:decompressedPath}|{dep:configuration:/port}|"
            "{other:artifacts:path}|{unknown:thing}")
    assert rcp.interpolate(text, own, {"dep": dep}).split("|") == [
        "/r/a/me/1", "/r/u/me/1", "x", "3", "[1, 2]", "true", "", "/r/w/me", "/r", "thing-1",
        "/r/a/dep/2", "/r/u/dep/2", "8080", "{other:artifacts:path}", "{unknown:thing}"]


def test_variables_and_environment_reach_the_process(nucleus, project):
    project.component("t.Dep", lifecycle={"Run": f"exec {PY} -c 'import time; time.sleep(600)'"},
                      config={"port": 8080}, zips={"bundle.zip": {"inside.txt": "dep"}})
    script = ("import json, os, sys; json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd(), "
              "'env': {k: os.environ.get(k) for k in ('SVCUID', 'AWS_IOT_THING_NAME', 'FROM_RECIPE', 'STEP', "
              "'AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT')}}, open('out.json', 'w'))")
    project.component(
        "t.Main", deps={"t.Dep": "HARD"}, config={"greeting": "hi"},
        files={"hello.py": script}, zips={"app.zip": {"pkg/mod.txt": "x"}},
        lifecycle={"Setenv": {"FROM_RECIPE": "{configuration:/greeting}"},
                   "Run": {"Script": f"{PY} {{artifacts:path}}/hello.py {{artifacts:decompressedPath}} "
                                     "{work:path} {kernel:rootPath} {iot:thingName} {configuration:/greeting} "
                                     "{t.Dep:artifacts:path} {t.Dep:artifacts:decompressedPath} "
                                     "{t.Dep:configuration:/port}",
                           "Setenv": {"STEP": "{iot:thingName}"}}})
    rec = deploy(nucleus, project, {"t.Main": "1.0.0"})
    assert rec.status == "SUCCEEDED", rec.failure_cause
    root = nucleus.root
    assert wait_for(lambda: nucleus.runner.service("t.Main").state == "FINISHED", 10)
    out = json.loads((root / "work" / "t.Main" / "out.json").read_text())
    assert out["argv"] == [str(root / "packages/artifacts-unarchived/t.Main/1.0.0"), str(root / "work/t.Main"),
                           str(root), THING, "hi", str(root / "packages/artifacts/t.Dep/1.0.0"),
                           str(root / "packages/artifacts-unarchived/t.Dep/1.0.0"), "8080"]
    assert out["cwd"] == str(root / "work" / "t.Main")
    assert out["env"]["SVCUID"] == nucleus.server.component("t.Main").token
    assert out["env"]["AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT"] == str(root / "ipc.socket")
    assert (out["env"]["AWS_IOT_THING_NAME"], out["env"]["FROM_RECIPE"], out["env"]["STEP"]) == (THING, "hi", THING)
    assert (root / "packages/artifacts-unarchived/t.Main/1.0.0/app/pkg/mod.txt").read_text() == "x"
    assert (root / "packages/artifacts-unarchived/t.Dep/1.0.0/bundle/inside.txt").read_text() == "dep"
    assert states(nucleus, "t.Main")[-1] == "FINISHED"


def test_install_startup_shutdown_in_order_and_startup_exit_0_is_running(nucleus, project):
    log = "steps.txt"
    project.component("t.Steps", lifecycle={
        "Install": f"echo install >> {log}",
        "Startup": f"echo startup >> {log}",
        "Run": f"echo run-is-ignored-with-startup >> {log}",
        "Shutdown": f"echo shutdown >> {log}"})
    rec = deploy(nucleus, project, {"t.Steps": "1.0.0"})
    assert rec.status == "SUCCEEDED", rec.failure_cause
    assert states(nucleus, "t.Steps") == ["NEW", "INSTALLED", "STARTING", "RUNNING"]
    nucleus.runner.stop_all()
    assert lines(nucleus.root / "work" / "t.Steps" / log) == ["install", "startup", "shutdown"]
    assert states(nucleus, "t.Steps")[-2:] == ["STOPPING", "FINISHED"]


def test_run_exit_0_is_finished_after_its_shutdown(nucleus, project):
    project.component("t.Once", lifecycle={"Run": "echo ran > r.txt", "Shutdown": "echo down > s.txt"})
    rec = deploy(nucleus, project, {"t.Once": "1.0.0"})
    assert rec.status == "SUCCEEDED"
    assert wait_for(lambda: nucleus.runner.service("t.Once").state == "FINISHED", 10)
    assert states(nucleus, "t.Once") == ["NEW", "INSTALLED", "STARTING", "RUNNING", "STOPPING", "FINISHED"]
    assert (nucleus.root / "work/t.Once/s.txt").read_text() == "down\n"


def test_a_crashing_component_is_restarted(nucleus, project):
    # fails the first time, then runs: ERRORED -> restarted -> RUNNING
    script = ("import os, sys, time; n = len(open('starts', 'a+').name) and "
              "sum(1 for _ in open('starts')); open('starts', 'a').write('x\\n'); "
              "sys.exit(2) if n == 0 else time.sleep(600)")
    project.component("t.Flaky", lifecycle={"Run": f"exec {PY} -c \"{script}\""})
    rec = deploy(nucleus, project, {"t.Flaky": "1.0.0"})
    assert rec.status == "SUCCEEDED"
    assert wait_for(lambda: len(lines(nucleus.root / "work/t.Flaky/starts")) == 2, 10)
    assert nucleus.runner.service("t.Flaky").state == "RUNNING"
    got = states(nucleus, "t.Flaky")
    assert got[got.index("ERRORED"):] == ["ERRORED", "STOPPING", "INSTALLED", "STARTING", "RUNNING"]


def test_a_component_that_keeps_crashing_is_broken_and_not_restarted(nucleus, project):
    project.component("t.Crash", lifecycle={"Run": "echo x >> starts; exit 3"})
    rec = deploy(nucleus, project, {"t.Crash": "1.0.0"})
    assert rec.status == "FAILED"
    assert rec.failure_cause.startswith("Service t.Crash in broken state after deployment: run exited with code 3")
    assert states(nucleus, "t.Crash").count("ERRORED") == 2
    assert states(nucleus, "t.Crash")[-1] == "BROKEN"
    assert lines(nucleus.root / "work/t.Crash/starts") == ["x", "x", "x"]
    # a restart gives it a new chance (and it breaks again)
    nucleus.restart_component("t.Crash")
    assert wait_for(lambda: len(lines(nucleus.root / "work/t.Crash/starts")) == 6, 10)
    assert wait_for(lambda: nucleus.runner.service("t.Crash").state == "BROKEN", 10)


def test_install_failure_is_retried_then_broken(nucleus, project):
    project.component("t.NoInstall", lifecycle={"Install": "echo i >> tries; exit 1", "Run": "echo never > ran"})
    rec = deploy(nucleus, project, {"t.NoInstall": "1.0.0"})
    assert rec.status == "FAILED" and "install exited with code 1" in rec.failure_cause
    assert states(nucleus, "t.NoInstall") == ["NEW", "ERRORED", "NEW", "ERRORED", "NEW", "BROKEN"]
    assert lines(nucleus.root / "work/t.NoInstall/tries") == ["i", "i", "i"]
    assert not (nucleus.root / "work/t.NoInstall/ran").exists()


def test_step_timeouts(nucleus, project):
    project.component("t.SlowInstall", lifecycle={"Install": {"Script": "exec sleep 30", "Timeout": 0.3},
                                                  "Run": "true"})
    project.component("t.SlowStartup", lifecycle={"Startup": {"Script": "exec sleep 30", "Timeout": 0.3}})
    rec = deploy(nucleus, project, {"t.SlowInstall": "1.0.0", "t.SlowStartup": "1.0.0"})
    assert rec.status == "FAILED"
    assert wait_for(lambda: nucleus.runner.service("t.SlowStartup").state == "BROKEN", 15)
    assert nucleus.runner.service("t.SlowInstall").state == "BROKEN"
    assert nucleus.runner.service("t.SlowInstall").status_reason == "install: install timed out after 0.3 s"
    assert nucleus.runner.service("t.SlowStartup").status_reason == "startup timed out after 0.3 s"


def test_dependency_order_and_hard_versus_soft(nucleus, project):
    forever = f"exec {PY} -c 'import time; time.sleep(600)'"
    project.component("t.Base", lifecycle={"Install": "sleep 0.3", "Run": forever})
    project.component("t.Hard", deps={"t.Base": "HARD"}, lifecycle={"Run": f"echo s >> starts; {forever}"})
    project.component("t.Soft", deps={"t.Base": "SOFT"}, lifecycle={"Run": f"echo s >> starts; {forever}"})
    rec = deploy(nucleus, project, {"t.Hard": "1.0.0", "t.Soft": "1.0.0"})
    assert rec.status == "SUCCEEDED", rec.failure_cause
    h = nucleus.history
    # HARD waits for its dependency to run; SOFT does not wait (as in the nucleus)
    assert h.index(("t.Base", "RUNNING")) < h.index(("t.Hard", "STARTING"))
    assert h.index(("t.Soft", "STARTING")) < h.index(("t.Base", "RUNNING"))
    nucleus.restart_component("t.Base")
    assert wait_for(lambda: len(lines(nucleus.root / "work/t.Hard/starts")) == 2, 10)
    assert wait_for(lambda: nucleus.runner.service("t.Hard").state == "RUNNING", 10)
    assert lines(nucleus.root / "work/t.Soft/starts") == ["s"]
    assert "STOPPING" not in states(nucleus, "t.Soft")


def test_log_files(nucleus, project):
    project.component("t.Talk", lifecycle={"Run": "echo to-stdout; echo to-stderr >&2"})
    rec = deploy(nucleus, project, {"t.Talk": "1.0.0"})
    assert rec.status == "SUCCEEDED"
    log = nucleus.root / "logs" / "t.Talk.log"
    text = "\n".join(wait_lines(log, lambda ls: any("newState=FINISHED" in x for x in ls)))
    assert "stdout. to-stdout" in text and "stderr. to-stderr" in text
    assert "deployment" in (nucleus.root / "logs" / "greengrass.log").read_text()
    token = nucleus.root / "cli" / "token"
    assert oct(os.stat(token).st_mode & 0o777) == "0o600"
