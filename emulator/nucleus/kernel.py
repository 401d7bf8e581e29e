"""The local nucleus process: its root folder, its log, and the parts it ties together.

Root layout (as the Greengrass nucleus's)::

    <root>/ipc.socket                          the IPC server (emulator.nucleus.ipc)
    <root>/cli/token                           the Greengrass CLI's IPC token (0600)
    <root>/logs/greengrass.log                 the nucleus's own log
    <root>/logs/<component>.log                each component's output and state changes
    <root>/packages/recipes/                   the component store's recipes
    <root>/packages/artifacts/<name>/<ver>/    artifacts
    <root>/packages/artifacts-unarchived/<name>/<ver>/<zip name>/
    <root>/work/<name>/                        each component's working directory
    <root>/config/deployed.json                the deployed set, started again at the next start
    <root>/deployments/<id>.json               each local deployment's result

:class:`Nucleus` runs the IPC server (:mod:`~emulator.nucleus.ipc`), the IoT Core bridge (the
real :class:`~emulator.nucleus.iotcore.IotCoreBridge` to a broker, or the in-memory
:class:`~emulator.nucleus.mqttproxy.MemoryIoTCore`), the components
(:mod:`~emulator.nucleus.runner`) and local deployments (:mod:`~emulator.nucleus.deployment`),
and answers the Greengrass CLI's IPC operations. ``stop()`` stops every component with its
shutdown step (dependents first), then the rest.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from awsiot.greengrasscoreipc import model

from emulator.nucleus.accesscontrol import CLI
from emulator.nucleus.deployment import Deployer, request_to_dict
from emulator.nucleus.ipc import IPCServer
from emulator.nucleus.localcli import ComponentInfo, DeploymentInfo
from emulator.nucleus.runner import Layout, Runner

CLI_COMPONENT = "aws.greengrass.Cli"
CLI_POLICY = {CLI: {"aws.greengrass.Cli:local": {
    "policyDescription": "The local Greengrass CLI: every operation on every component and deployment.",
    "operations": ["*"], "resources": ["*"]}}}

log = logging.getLogger("emulator.nucleus")


def token_path(root: str | Path) -> Path:
    return Path(root) / "cli" / "token"


def socket_path(root: str | Path) -> Path:
    return Path(root).resolve() / "ipc.socket"


class Nucleus:
    """One local nucleus on ``root`` for thing ``thing_name``.

    ::

        with Nucleus(root, "meter-gw-1") as nucleus:      # an in-memory IoT Core
            deployment_id = nucleus.deployer.submit({...})
    """

    def __init__(self, root: str | Path, thing_name: str, *, iotcore: Any = None, offer_timeout: float = 60.0,
                 validate_timeout: float = 30.0) -> None:
        self.layout = Layout(root)
        self.root = self.layout.root
        self.thing_name = thing_name
        self.server = IPCServer(socket_path(self.root), thing_name=thing_name, iotcore=iotcore, cli_hooks=self)
        self.runner = Runner(self.server, self.layout)
        self.deployer = Deployer(self.server, self.runner, offer_timeout=offer_timeout,
                                 validate_timeout=validate_timeout)
        self._handler: logging.Handler | None = None

    def start(self) -> Nucleus:
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        self._handler = logging.FileHandler(self.layout.nucleus_log, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] (%(threadName)s) %(name)s: %(message)s"))
        logging.getLogger("emulator").addHandler(self._handler)
        if logging.getLogger("emulator").getEffectiveLevel() > logging.INFO:
            logging.getLogger("emulator").setLevel(logging.INFO)
        log.info("nucleus starting on %s for thing %s", self.root, self.thing_name)
        self.server.start()
        token = self.server.register_component(CLI_COMPONENT, version="2.14.0", access_control=CLI_POLICY)
        path = token_path(self.root)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        os.chmod(path, 0o600)
        names = self.deployer.restore()
        self.runner.start_all(names)
        self.deployer.start()
        log.info("nucleus started: %d components", len(names))
        return self

    def stop(self) -> None:
        log.info("nucleus stopping")
        self.deployer.stop()
        self.runner.stop_all()
        self.server.stop()
        log.info("nucleus stopped")
        if self._handler is not None:
            logging.getLogger("emulator").removeHandler(self._handler)
            self._handler.close()
            self._handler = None

    def __enter__(self) -> Nucleus:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- the Greengrass CLI's hooks (emulator.nucleus.localcli)
    def list_components(self) -> list[ComponentInfo]:
        return self.deployer.components()

    def get_component_details(self, name: str) -> ComponentInfo | None:
        return self.deployer.component(name)

    def restart_component(self, name: str) -> None:
        service = self.runner.service(name)
        if service is None:
            raise model.ResourceNotFoundError(message=f"Component {name} not found", resource_type="Component",
                                              resource_name=name)
        service.request_restart()

    def create_local_deployment(self, request: model.CreateLocalDeploymentRequest) -> str:
        return self.deployer.submit(request_to_dict(request))

    def get_local_deployment_status(self, deployment_id: str) -> DeploymentInfo | None:
        rec = self.deployer.record(deployment_id)
        return None if rec is None else rec.info()
