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
    <root>/config/nucleus.json                 the nucleus's own configuration (see below)
    <root>/deployments/<id>.json               each local deployment's result
    <root>/work/aws.greengrass.DiskSpooler/spooler.db   the spool, with storageType Disk

:class:`Nucleus` runs the IPC server (:mod:`~emulator.nucleus.ipc`), the IoT Core bridge, the
components (:mod:`~emulator.nucleus.runner`) and local deployments
(:mod:`~emulator.nucleus.deployment`), and answers the Greengrass CLI's IPC operations.
``stop()`` stops every component with its shutdown step (dependents first), then the rest; the
bridge closes last, so what components publish while they stop is still spooled.

**IoT Core.** Given an :class:`Endpoint` (a broker and the thing's certificate), the nucleus
connects the real bridge, as the Java nucleus's MQTT client does::

    MqttProxy(MqttProxyBridge(IotCoreBridge(host, port, thing, cert, key, ca, spool=...).start()), acl)

so PublishToIoTCore and SubscribeToIoTCore go to the broker through the spooler, and
SubscribeToIoTCoreConnectionStatus streams follow the bridge's status listeners. Without one,
IoT Core is the in-memory :class:`~emulator.nucleus.mqttproxy.MemoryIoTCore` (or the
``iotcore`` given).

**The nucleus's configuration** is ``aws.greengrass.Nucleus``'s (what a real device has under
``services.aws.greengrass.Nucleus.configuration``). Only its ``mqtt`` section is read
(:func:`bridge_settings`): ``spooler`` (``storageType``, ``maxSizeInBytes``,
``keepQos0WhenOffline``, ``pluginName``, read by
:meth:`~emulator.nucleus.spool.SpoolConfig.from_nucleus`), ``maxInFlightPublishes``,
``maxPublishRetry``, ``maxMessageSizeInBytes``, ``operationTimeoutMs`` and
``keepAliveTimeoutMs``; the nucleus's other ``mqtt`` keys are accepted and not modelled. As
greengrass's ``--init-config``, a configuration given at start is kept in
``<root>/config/nucleus.json`` and used by later starts that give none.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from awsiot.greengrasscoreipc import model

from emulator.nucleus.accesscontrol import CLI
from emulator.nucleus.deployment import Deployer, request_to_dict
from emulator.nucleus.ipc import IPCServer
from emulator.nucleus.localcli import ComponentInfo, DeploymentInfo
from emulator.nucleus.runner import Layout, Runner
from emulator.nucleus.spool import SpoolConfig
from gateway.errors import ConfigError

CLI_COMPONENT = "aws.greengrass.Cli"
CLI_POLICY = {CLI: {"aws.greengrass.Cli:local": {
    "policyDescription": "The local Greengrass CLI: every operation on every component and deployment.",
    "operations": ["*"], "resources": ["*"]}}}

log = logging.getLogger("emulator.nucleus")

NUCLEUS_COMPONENT = "aws.greengrass.Nucleus"
DISK_SPOOLER = "aws.greengrass.DiskSpooler"
#: The nucleus's ``mqtt`` keys the bridge takes: key -> (IotCoreBridge keyword, scale to its unit).
MQTT_KEYS = {"maxInFlightPublishes": ("max_in_flight", 1), "maxPublishRetry": ("max_publish_retry", 1),
             "maxMessageSizeInBytes": ("max_message_size", 1), "operationTimeoutMs": ("operation_timeout", 0.001),
             "keepAliveTimeoutMs": ("keep_alive", 0.001)}
#: The nucleus's other ``mqtt`` keys: accepted, not modelled by the local bridge.
MQTT_IGNORED = {"port", "pingTimeoutMs", "socketTimeoutMs", "version", "receiveMaximum", "maximumPacketSize",
                "sessionExpirySeconds", "proxy", "maxPartitions"}


@dataclass(frozen=True)
class Endpoint:
    """Where IoT Core is (a broker standing in for it) and the thing's mutual-TLS credentials."""

    host: str
    port: int
    cert: Path
    key: Path
    ca: Path | None

    @classmethod
    def from_certs(cls, host: str, port: int, certs: str | os.PathLike, thing_name: str) -> Endpoint:
        """From a folder as :func:`emulator.broker.make_certs` writes it: ``ca.crt``,
        ``client-<thing>.crt``, ``client-<thing>.key``; raises ConfigError naming a missing file."""
        d = Path(certs)
        cert, key, ca = d / f"client-{thing_name}.crt", d / f"client-{thing_name}.key", d / "ca.crt"
        for path in (cert, key, ca):
            if not path.is_file():
                raise ConfigError("--certs", f"{path} is missing (the folder must hold ca.crt, "
                                             f"client-{thing_name}.crt and client-{thing_name}.key)")
        return cls(host, port, cert, key, ca)


def read_config(path: str | os.PathLike) -> dict:
    """The nucleus's configuration from a YAML or JSON file: either that configuration itself
    (``{"mqtt": {"spooler": {...}}}``) or greengrass's config.yaml shape
    (``services: {aws.greengrass.Nucleus: {configuration: {...}}}``). Raises ConfigError."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"neither YAML nor JSON: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), f"must be a mapping, got {type(data).__name__}")
    if "services" in data:
        service = (data.get("services") or {}).get(NUCLEUS_COMPONENT) or {}
        data = service.get("configuration") or {} if isinstance(service, dict) else {}
        if not isinstance(data, dict):
            raise ConfigError(f"services.{NUCLEUS_COMPONENT}.configuration", "must be a mapping")
    return data


def bridge_settings(config: Mapping | None, root: str | os.PathLike) -> tuple[SpoolConfig, dict]:
    """The spooler's settings and the bridge's keywords from the nucleus's configuration (its
    ``mqtt`` section); raises ConfigError naming the key. A Disk spool lives in
    ``<root>/work/aws.greengrass.DiskSpooler/spooler.db``."""
    mqtt = (config or {}).get("mqtt") or {}
    if not isinstance(mqtt, Mapping):
        raise ConfigError("mqtt", f"{mqtt!r} must be a mapping")
    unknown = sorted(set(mqtt) - set(MQTT_KEYS) - MQTT_IGNORED - {"spooler"})
    if unknown:
        raise ConfigError(f"mqtt.{unknown[0]}", f"unknown key; known: {', '.join(sorted(MQTT_KEYS) + ['spooler'])}")
    spooler = mqtt.get("spooler")
    if spooler is not None and not isinstance(spooler, Mapping):
        raise ConfigError("mqtt.spooler", f"{spooler!r} must be a mapping")
    disk = (spooler or {}).get("storageType") == "Disk"
    path = Path(root) / "work" / DISK_SPOOLER / "spooler.db" if disk else None
    spool = SpoolConfig.from_nucleus(spooler, path=path)
    kwargs: dict = {}
    for key, (name, scale) in MQTT_KEYS.items():
        if key not in mqtt:
            continue
        value = mqtt[key]
        if type(value) is not int:
            raise ConfigError(f"mqtt.{key}", f"{value!r} must be an integer")
        kwargs[name] = value if scale == 1 else value * scale
    if "keep_alive" in kwargs:
        kwargs["keep_alive"] = max(1, round(kwargs["keep_alive"]))
    return spool, kwargs


def token_path(root: str | Path) -> Path:
    return Path(root) / "cli" / "token"


def socket_path(root: str | Path) -> Path:
    return Path(root).resolve() / "ipc.socket"


class Nucleus:
    """One local nucleus on ``root`` for thing ``thing_name``.

    ::

        with Nucleus(root, "meter-gw-1") as nucleus:      # an in-memory IoT Core
            deployment_id = nucleus.deployer.submit({...})

        endpoint = Endpoint.from_certs("localhost", broker.port, certs_dir, "meter-gw-1")
        with Nucleus(root, "meter-gw-1", endpoint=endpoint, config={"mqtt": {"spooler": {...}}}) as nucleus:
            nucleus.bridge.wait_connected(10)             # the real bridge, to the broker

    ``config``: the nucleus's configuration (module doc); None takes the one kept in the root.
    ``bridge_options``: more :class:`~emulator.nucleus.iotcore.IotCoreBridge` keywords (tests
    shorten its reconnect delays). Raises ConfigError for a bad configuration or certificate.
    """

    def __init__(self, root: str | Path, thing_name: str, *, iotcore: Any = None, endpoint: Endpoint | None = None,
                 config: Mapping | None = None, bridge_options: Mapping | None = None, offer_timeout: float = 60.0,
                 validate_timeout: float = 30.0) -> None:
        if iotcore is not None and endpoint is not None:
            raise ValueError("give iotcore or endpoint, not both")
        self.layout = Layout(root)
        self.root = self.layout.root
        self.thing_name = thing_name
        self._config_given = config is not None
        self.config = dict(config) if config is not None else self._saved_config()
        self.bridge = None
        spool, kwargs = bridge_settings(self.config, self.root)  # checked with an in-memory IoT Core too
        if endpoint is not None:
            from emulator.nucleus.iotcore import IotCoreBridge, MqttProxyBridge

            kwargs.update(bridge_options or {})
            self.bridge = IotCoreBridge(endpoint.host, endpoint.port, thing_name, endpoint.cert, endpoint.key,
                                        endpoint.ca, spool=spool, **kwargs)
            iotcore = MqttProxyBridge(self.bridge)
        self.endpoint = endpoint
        self.server = IPCServer(socket_path(self.root), thing_name=thing_name, iotcore=iotcore, cli_hooks=self)
        self.runner = Runner(self.server, self.layout)
        self.deployer = Deployer(self.server, self.runner, offer_timeout=offer_timeout,
                                 validate_timeout=validate_timeout)
        self._handler: logging.Handler | None = None

    @property
    def config_file(self) -> Path:
        return self.root / "config" / "nucleus.json"

    def _saved_config(self) -> dict:
        try:
            return json.loads(self.config_file.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise ConfigError(str(self.config_file), f"not JSON: {exc}") from exc

    def start(self) -> Nucleus:
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        self._handler = logging.FileHandler(self.layout.nucleus_log, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] (%(threadName)s) %(name)s: %(message)s"))
        logging.getLogger("emulator").addHandler(self._handler)
        if logging.getLogger("emulator").getEffectiveLevel() > logging.INFO:
            logging.getLogger("emulator").setLevel(logging.INFO)
        log.info("nucleus starting on %s for thing %s", self.root, self.thing_name)
        if self._config_given:
            self.config_file.parent.mkdir(parents=True, exist_ok=True)
            self.config_file.write_text(json.dumps(self.config, indent=2))
        if self.bridge is not None:
            e = self.endpoint
            log.info("IoT Core: %s:%d as %s, spooler %s", e.host, e.port, self.thing_name, self.bridge.spool_config)
            self.bridge.start()
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
        if self.bridge is not None:
            self.bridge.close()
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
