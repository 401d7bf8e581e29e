"""``gateway nucleus``: run the local nucleus, and greengrass-cli's verbs against it.

``gateway nucleus --root DIR --thing NAME`` runs a nucleus in the foreground (an in-memory IoT
Core, or ``--broker host:port --certs DIR`` for a mosquitto from :mod:`emulator.broker`, with
``--config FILE`` for the nucleus's own configuration, e.g. its spooler); Ctrl-C or SIGTERM
stops every component with its shutdown step. The other verbs are clients: they talk
to the nucleus running on ``--root`` over its IPC socket, with the awsiotsdk
``GreengrassCoreIPCClientV2`` and the token the nucleus wrote to ``<root>/cli/token``, as
greengrass-cli does.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

import click

ROOT = click.option("--root", required=True, type=click.Path(file_okay=False), help="The nucleus's root folder.")


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _client(root: str):
    from awsiot import greengrasscoreipc
    from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2

    from emulator.nucleus.kernel import socket_path, token_path

    sock, token = socket_path(root), token_path(root)
    if not sock.exists() or not token.exists():
        _fail(f"no nucleus is running on {root} ({sock} or {token} is missing): start one with "
              f"`gateway nucleus --root {root} --thing NAME`")
    try:
        client = greengrasscoreipc.connect(ipc_socket=str(sock), authtoken=token.read_text().strip(), timeout=10.0)
    except Exception as exc:
        _fail(f"cannot reach the nucleus on {sock}: {exc}")
    return GreengrassCoreIPCClientV2(client=client)


def _call(fn, *args, **kwargs):
    from awsiot.greengrasscoreipc.model import GreengrassCoreIPCError

    try:
        return fn(*args, **kwargs)
    except GreengrassCoreIPCError as exc:
        _fail(f"{type(exc).__name__}: {getattr(exc, 'message', exc)}")


@click.group(invoke_without_command=True)
@click.option("--root", type=click.Path(file_okay=False), help="The nucleus's root folder (made if missing).")
@click.option("--thing", help="The core device's thing name.")
@click.option("--broker", help="host:port of the MQTT broker standing in for IoT Core (default: in memory).")
@click.option("--certs", type=click.Path(file_okay=False),
              help="Folder of make_certs output: ca.crt, client-<thing>.crt and .key (with --broker).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="The nucleus's configuration (YAML or JSON: {mqtt: {spooler: ...}}, or config.yaml's "
                   "services.aws.greengrass.Nucleus.configuration); kept in the root for later starts.")
@click.pass_context
def nucleus(ctx: click.Context, root: str | None, thing: str | None, broker: str | None, certs: str | None,
            config_file: str | None) -> None:
    """Run a local Greengrass nucleus, or manage the one on --root (greengrass-cli's verbs)."""
    if ctx.invoked_subcommand is not None:
        return
    if not root or not thing:
        _fail("gateway nucleus needs --root DIR and --thing NAME to start a nucleus")
    from emulator.nucleus.kernel import Endpoint, Nucleus, read_config
    from gateway.errors import ConfigError

    endpoint = None
    try:
        config = read_config(config_file) if config_file else None
        if broker:
            if not certs:
                _fail("--broker needs --certs DIR")
            host, _, port = broker.rpartition(":")
            if not host or not port.isdigit():
                _fail(f"--broker {broker!r} is not host:port")
            endpoint = Endpoint.from_certs(host, int(port), certs, thing)
        elif certs:
            _fail("--certs needs --broker HOST:PORT")
        Path(root).mkdir(parents=True, exist_ok=True)
        node = Nucleus(root, thing, endpoint=endpoint, config=config)
    except ConfigError as exc:
        _fail(f"--config {config_file}: {exc}" if config_file and exc.path.startswith("mqtt") else str(exc))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        node.start()
    except (OSError, ValueError, ConfigError) as exc:
        _fail(f"the nucleus cannot start on {root}: {exc}")
    where = f"IoT Core at {broker} (spooler {node.bridge.spool_config.storage_type})" if broker else \
        "in-memory IoT Core"
    click.echo(f"nucleus running on {node.root} for {thing} ({where}); Ctrl-C stops it")
    try:
        stop.wait()
    finally:
        click.echo("stopping every component")
        node.stop()


@nucleus.group()
def deployment() -> None:
    """Local deployments (greengrass-cli deployment)."""


def _config_arg(value: str | None) -> dict:
    if not value:
        return {}
    try:
        text = Path(value).read_text() if Path(value).is_file() else value
    except OSError:  # a JSON string too long to be a file name
        text = value
    try:
        data = json.loads(text)
    except ValueError as exc:
        _fail(f"--update-config is neither a JSON file nor JSON: {exc}")
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        _fail('--update-config must be {"<component>": {"MERGE": {...}, "RESET": ["/path", ...]}}')
    return data


@deployment.command("create")
@ROOT
@click.option("--recipeDir", "recipe_dir", type=click.Path(exists=True, file_okay=False), help="Folder of recipes.")
@click.option("--artifactDir", "artifact_dir", type=click.Path(exists=True, file_okay=False),
              help="Folder of artifacts as <name>/<version>/<file>.")
@click.option("--merge", "merges", multiple=True, metavar="NAME=VERSION", help="Add or update a root component.")
@click.option("--remove", "removes", multiple=True, metavar="NAME", help="Remove a root component.")
@click.option("--update-config", "update_config", metavar="FILE|JSON",
              help='{"<component>": {"MERGE": {...}, "RESET": ["/path"]}}')
@click.option("--groupId", "group_id", default=None, help="The thing group (default: LOCAL_DEPLOYMENT).")
@click.option("--wait", "wait_s", type=float, default=None, metavar="SECONDS",
              help="Wait up to this long for the result; exit 1 if it failed.")
def deployment_create(root, recipe_dir, artifact_dir, merges, removes, update_config, group_id, wait_s) -> None:
    """Create a local deployment (greengrass-cli deployment create)."""
    add = {}
    for m in merges:
        name, sep, version = m.partition("=")
        if not sep or not name or not version:
            _fail(f"--merge {m!r} is not NAME=VERSION")
        add[name] = version
    ipc = _client(root)
    resp = _call(ipc.create_local_deployment, group_name=group_id, root_component_versions_to_add=add or None,
                 root_components_to_remove=list(removes) or None,
                 component_to_configuration=_config_arg(update_config) or None,
                 recipe_directory_path=str(Path(recipe_dir).resolve()) if recipe_dir else None,
                 artifacts_directory_path=str(Path(artifact_dir).resolve()) if artifact_dir else None)
    click.echo(f"Local deployment submitted! Deployment Id: {resp.deployment_id}")
    if wait_s is not None:
        import time

        deadline = time.monotonic() + wait_s
        while True:
            d = _call(ipc.get_local_deployment_status, deployment_id=resp.deployment_id).deployment
            if d.status in ("SUCCEEDED", "FAILED") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        _print_status(d)
        if d.status != "SUCCEEDED":
            sys.exit(1)
    ipc.close()


def _print_status(d) -> None:
    click.echo(f"{d.deployment_id}: {d.status}")
    click.echo(f"Created on: {d.created_on}")
    details = d.deployment_status_details
    if details is not None and details.deployment_failure_cause:
        click.echo(f"Failure cause: {details.deployment_failure_cause}")


@deployment.command("status")
@ROOT
@click.argument("deployment_id")
def deployment_status(root, deployment_id) -> None:
    """Show a local deployment's status (greengrass-cli deployment status)."""
    ipc = _client(root)
    _print_status(_call(ipc.get_local_deployment_status, deployment_id=deployment_id).deployment)
    ipc.close()


@nucleus.group()
def component() -> None:
    """The nucleus's components (greengrass-cli component)."""


@component.command("list")
@ROOT
def component_list(root) -> None:
    """List the components, their versions, states and configurations."""
    ipc = _client(root)
    comps = _call(ipc.list_components).components or []
    click.echo("Components currently running in Greengrass:")
    for c in comps:
        click.echo(f"Component Name: {c.component_name}")
        click.echo(f"    Version: {c.version}")
        click.echo(f"    State: {c.state}")
        click.echo(f"    Configuration: {json.dumps(c.configuration, sort_keys=True)}")
    ipc.close()


@component.command("restart")
@ROOT
@click.argument("names", nargs=-1, required=True)
def component_restart(root, names) -> None:
    """Restart components by name."""
    ipc = _client(root)
    for name in names:
        r = _call(ipc.restart_component, component_name=name)
        click.echo(f"{name}: restart {r.restart_status}" + (f" ({r.message})" if r.message else ""))
    ipc.close()


@nucleus.command("logs")
@ROOT
@click.argument("name", required=False)
@click.option("--lines", "-n", type=int, default=None, help="Only the last N lines.")
def logs(root, name, lines) -> None:
    """Print the nucleus's log (greengrass.log), or a component's (<root>/logs/NAME.log)."""
    path = Path(root) / "logs" / f"{name or 'greengrass'}.log"
    if not path.exists():
        have = sorted(p.stem for p in (Path(root) / "logs").glob("*.log"))
        _fail(f"no log {path}; logs here: {', '.join(have) or 'none'}")
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for line in text[-lines:] if lines else text:
        click.echo(line)
