"""The ``gateway`` command: run, status, quarantine, score, bench, model, demo, build.

Each command opens what it needs, calls one library function, and turns a
:class:`~gateway.errors.GatewayError` into a message a person can act on (exit code 2).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path

import click

from gateway.errors import ConfigError, GatewayError


def _fail(exc: BaseException, config_path: str | None = None) -> None:
    if isinstance(exc, ConfigError):
        where = f" {config_path}" if config_path else ""
        click.echo(f"error: invalid config{where}:\n{exc}", err=True)
    else:
        click.echo(f"error: {exc}", err=True)
    sys.exit(2)


def _ts(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


@click.group()
@click.version_option(package_name="meter-gateway")
def main() -> None:
    """Edge gateway for building energy meters."""


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="YAML config file.")
@click.option("--exit-when-idle", is_flag=True, help="Stop once every source is done and everything is acknowledged.")
@click.option("--check", is_flag=True, help="Run every check a start runs (certificates, model, files) and exit.")
def run(config_path: str, exit_when_idle: bool, check: bool) -> None:
    """Run sources → buffer → forwarder until Ctrl-C or SIGTERM."""
    from gateway import config as cfg
    from gateway import preflight

    try:
        config = cfg.load(config_path)
        preflight.check(config)  # before anything is created: a bad config leaves no buffer file
    except GatewayError as exc:
        _fail(exc, config_path)
    if check:
        click.echo(f"{config_path}: ok")
        return
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from gateway.runner import Gateway

    try:
        gw = Gateway(config)
    except GatewayError as exc:
        _fail(exc)
    def _stop(signum, frame):  # noqa: ARG001
        gw.stop_event.set()
        gw.forwarder.wake.set()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    failure: GatewayError | None = None
    try:
        gw.start()
        try:
            gw.wait(until_idle=exit_when_idle)  # the idle check reads the buffer too (a damaged page)
        except GatewayError as exc:
            failure = exc
        gw.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure is not None:
        click.echo(f"error: {failure}", err=True)
        sys.exit(1)
    f = gw.forwarder
    click.echo(
        f"stopped: {gw.buffer.stats['stored']} stored, {gw.buffer.stats['delivered']} delivered, "
        f"{gw.buffer.stats['quarantined']} quarantined, {f.published} messages published"
    )
    dead = gw.dead()
    for stage, error in dead.items():
        click.echo(f"error: {stage} is dead: {error}", err=True)
    if dead:
        sys.exit(1)  # so the Greengrass nucleus restarts the component


def _open_buffer(config_path: str | None, db: str | None):
    from gateway.buffer import Buffer

    if db is None:
        if config_path is None:
            raise click.UsageError("give --config or --db")
        from gateway import config as cfg

        conf = cfg.load(config_path)
        return Buffer(conf.buffer["path"], budget_bytes=conf.buffer["budget_bytes"],
                      policy=conf.buffer["policy"], readonly=True)
    return Buffer(db, readonly=True)


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML config file.")
@click.option("--db", type=click.Path(dir_okay=False), help="The buffer file (instead of --config).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(config_path: str | None, db: str | None, as_json: bool) -> None:
    """Buffer depth, oldest unsent age, rates, evictions and hours of autonomy left."""
    try:
        buf = _open_buffer(config_path, db)
        st = buf.status()
        from gateway.model.scoring import stored_status

        st["scoring"] = stored_status(buf.db)
        buf.close()
    except GatewayError as exc:
        _fail(exc, config_path)
    if as_json:
        click.echo(json.dumps(st))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"buffer {st['path']}", show_header=False)
    age = st["oldest_pending_age_s"]
    autonomy = st["autonomy_hours"]
    rows = [
        ("pending readings", f"{st['pending']:,}"),
        ("oldest unsent", f"{_ts(st['oldest_pending_ts'])}" + (f" ({age / 3600:,.1f} h ago)" if age else "")),
        ("ingest rate", f"{st['ingest_per_h'] / 3600:,.1f} readings/s"),
        ("delivery rate", f"{st['delivered_per_h'] / 3600:,.1f} readings/s"),
        ("used / budget", f"{st['used_bytes'] / 2**20:,.1f} MiB / {st['budget_bytes'] / 2**20:,.0f} MiB ({st['policy']})"),
        ("bytes per reading", f"{st['bytes_per_reading']}"),
        ("autonomy left", f"{autonomy:,.1f} h at the current rate" if autonomy is not None else "unknown (no recent ingest)"),
        ("stored / delivered", f"{st['stored']:,} / {st['delivered']:,}"),
        ("duplicates ignored", f"{st['duplicates']:,}"),
        ("quarantined", f"{st['quarantined']:,} readings, {st['undeliverable']:,} messages"),
        ("evictions", f"{st['evicted_oldest']:,} oldest dropped, {st['rejected_newest']:,} newest refused"),
        ("live lane", "open (backlog draining behind live readings)" if st["live_lane"] else "closed"),
    ]
    sc = st.get("scoring")
    if sc:
        model = sc["model"]
        rows.append(("model", f"{model['version']}" + (f" (last swap refused: {model['last_error']})"
                                                        if model.get("last_error") else "")))
        rows.append(("scored / flagged", f"{sc['scored']:,} / {sc['flagged']:,} anomalies"))
        why = "; ".join(f"{k} ({v:,})" for k, v in sc["unscored_reasons"].items())
        rows.append(("not scored", f"{sc['unscored']:,}" + (f": {why}" if why else "")))
        d = sc.get("drift")
        if d and d["fleet"]["rmsle"] is not None:
            rows.append(("model drift", f"RMSLE of the model alone {d['fleet']['rmsle']} over {d['window_h']:g} h "
                                        f"({d['fleet']['count']:,} readings)"
                                        + (f", stale: {', '.join(d['stale_keys'])}" if d["stale"] else "")))
    rows += _stage_rows(st.get("health"))
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)


def _stage_rows(health: dict | None) -> list[tuple[str, str]]:
    """One row per stage saved by a running (or the last) ``gateway run``."""
    if not health:
        return [("stages", "unknown (no gateway run has recorded them)")]
    rows = []
    for name, s in sorted(health.get("stages", {}).items()):
        text = f"{s['state']} since {_ts(s.get('since'))}"
        if s.get("retries"):
            text += f" after {s['retries']:,} {'retry' if s['retries'] == 1 else 'retries'}"
        if s.get("error"):
            text += f": {s['error']}"
        rows.append((f"stage {name}", text))
    return rows


@main.group(invoke_without_command=True)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML config file.")
@click.option("--db", type=click.Path(dir_okay=False), help="The buffer file (instead of --config).")
@click.option("--limit", default=50, show_default=True, help="How many entries.")
@click.option("--kind", type=click.Choice(["reading", "message"]), help="Only readings or only messages.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def quarantine(ctx: click.Context, config_path: str | None, db: str | None, limit: int, kind: str | None,
               as_json: bool) -> None:
    """List quarantined readings and messages, with their reasons (`replay` re-queues them)."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        buf = _open_buffer(config_path, db)
        rows = buf.quarantined(limit=limit, kind=kind)
        buf.close()
    except GatewayError as exc:
        _fail(exc, config_path)
    if as_json:
        for r in rows:
            click.echo(json.dumps(r))
        return
    if not rows:
        click.echo("quarantine is empty")
        return
    for r in rows:
        raw = r["raw"] if len(r["raw"]) <= 120 else r["raw"][:117] + "..."
        click.echo(f"#{r['id']} {r['kind']} {r['location']} ({r['source']}): {r['reason']}\n    {raw}")


@quarantine.command("replay")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML config file.")
@click.option("--db", type=click.Path(dir_okay=False), help="The buffer file (instead of --config).")
@click.option("--id", "ids", type=int, multiple=True, help="Only these entries (repeatable).")
@click.option("--kind", type=click.Choice(["reading", "message"]), help="Only readings or only messages.")
def quarantine_replay(config_path: str | None, db: str | None, ids: tuple[int, ...], kind: str | None) -> None:
    """Re-queue quarantined messages, and readings that now pass, once their cause is fixed.

    A message's readings go back into the buffer to be sent again; a reading is stored if it now
    passes the checks. What still fails stays quarantined, with the reason. The gateway must be
    stopped: this takes the buffer's lock."""
    from gateway.buffer import Buffer

    try:
        if db is None:
            if config_path is None:
                raise click.UsageError("give --config or --db")
            from gateway import config as cfg

            b = cfg.load(config_path).buffer
            buf = Buffer(b["path"], budget_bytes=b["budget_bytes"], policy=b["policy"])
        else:
            buf = Buffer(db)
        try:
            out = buf.replay_quarantine(ids or None, kind=kind)
        finally:
            buf.close()
    except GatewayError as exc:
        _fail(exc, config_path)
    click.echo(f"re-queued {out['entries']} entries ({out['readings']} readings); {out['kept']} kept")
    for qid, reason in out["reasons"].items():
        click.echo(f"  kept #{qid}: {reason}")



@main.command()
@click.option("--readings", "n", default=200_000, show_default=True, help="How many readings to push through.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
@click.option("--no-score", is_flag=True, help="Skip the scoring stage.")
@click.option("--startup-readings", default=3_000_000, show_default=True,
              help="Readings buffered for the start-up measure.")
@click.option("--iotcore-readings", default=40_000, show_default=True,
              help="Readings drained through IoT Core's flow control (about 10-20 s at its limits).")
@click.option("--key-ticks", default=30, show_default=True,
              help="Fleet ticks written per key layout in the time-first vs meter-first measure.")
@click.option("--key-prefill-ticks", default=300, show_default=True,
              help="Fleet ticks stored before the key measure (a small table hides a meter-first key's cost).")
@click.option("--gateway-readings", type=int, default=None,
              help="Readings for the real `gateway run` (default: --readings).")
def bench(n: int, as_json: bool, no_score: bool, startup_readings: int, iotcore_readings: int, key_ticks: int,
          key_prefill_ticks: int, gateway_readings: int | None) -> None:
    """Measure ingest, drain, scoring, start-up, the gateway's memory and disk writes against
    their raw limits or goals, and the capacity against IoT Core's limits, in this run."""
    from gateway import bench as b

    say = (lambda s: click.echo(s, err=True)) if as_json else click.echo
    result = b.run(n, score=not no_score, startup_n=startup_readings, iotcore_n=iotcore_readings,
                   key_ticks=key_ticks, key_prefill_ticks=key_prefill_ticks, gateway_n=gateway_readings,
                   progress=lambda s: say(f"· {s}"))
    ok = b.verdicts(result)
    if not as_json:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"gateway bench ({n:,} readings)")
        t.add_column("measure")
        t.add_column("value", justify="right")
        t.add_column("goal")
        for key, value in result.items():
            goal = b.GOALS.get(key)
            mark = "" if key not in ok else (" ✓" if ok[key] else " ✗")
            shown = f"{value:,.3f}" if isinstance(value, float) else str(value)
            t.add_row(key, shown, (f"{goal[0]} {goal[1]:,}" + mark) if goal else "")
        Console().print(t)
    else:
        click.echo(b.to_json(result))



@main.command()
@click.option("--workdir", default="var/demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the build, certificates, broker, nucleus and emulated cloud go (wiped first).")
@click.option("--exit", "exit_after", is_flag=True, help="Quit after the summary instead of serving the dashboard.")
@click.option("--port", default=8050, show_default=True, help="The dashboard's port on 127.0.0.1 (0: a free one).")
@click.option("--broker-port", default=0, show_default=True, help="mosquitto's port on 127.0.0.1 (0: a free one).")
@click.option("--fleet-port", default=0, show_default=True,
              help="The first of the Modbus fleet's three ports on 127.0.0.1 (0: free ones).")
@click.option("--poll-s", default=2, show_default=True, type=click.IntRange(1, 60),
              help="The modbus source's interval_s (each poll reads an hour of fleet time).")
@click.option("--polls", default=5, show_default=True, type=click.IntRange(1, 1000),
              help="Readings of each fleet meter before the fleet source is removed.")
@click.option("--cycle", "with_cycle", is_flag=True,
              help="Show the retraining loop instead of the fleet: a site's consumption shifts part-way through "
                   "the sample, drift rises, gateway cycle promotes a retrained model, the gateway swaps it live, "
                   "drift falls. The summary line adds promoted=OLD->NEW drift_before=X drift_after=Y.")
def demo(workdir: str, exit_after: bool, port: int, broker_port: int, fleet_port: int, poll_s: int,
         polls: int, with_cycle: bool) -> None:
    """The whole chain on this machine: build both components, mosquitto as IoT Core, the local
    nucleus running them, a Modbus fleet of the sample's meters, the rules engine, Firehose/S3/
    Athena, IoT Analytics and the dashboard. Ends with `sent=N delivered=N anomalies=N`, then
    serves the dashboard until Ctrl-C. With --cycle: the retraining loop (train, compare, publish,
    deploy, swap live) on a shifted sample instead of the fleet."""
    import threading

    from emulator import demo as d

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell's background job starts with it ignored
        signal.signal(sig, interrupt)
    run = d.Demo(Path(workdir), port=port, broker_port=broker_port, fleet_port=fleet_port, poll_s=poll_s,
                 polls=polls, say=click.echo, cycle=with_cycle)
    code = 0
    try:
        summary = run.run()
        d.show(summary, say=click.echo)
        c = summary.cycle
        if summary.delivered != summary.sent:
            click.echo(f"error: {summary.sent - summary.delivered:,} of the {summary.sent:,} readings the gateway "
                       f"stored are not in the analytics store (see {run.workdir})", err=True)
            code = 1
        elif c is not None and not c.after.get("rmsle", 0) < c.before.get("rmsle", 0):
            click.echo(f"error: drift of {c.key} did not fall after the new model: {c.fields}", err=True)
            code = 1
        elif not exit_after:
            click.echo(f"serving the dashboard at {summary.url} until Ctrl-C (everything else is stopped)")
            threading.Event().wait()
    except KeyboardInterrupt:
        click.echo("interrupted: stopping everything the demo started", err=True)
        code = 130
    except (d.DemoError, GatewayError) as exc:
        click.echo(f"error: {exc}", err=True)
        code = 1
    finally:
        run.close()
    sys.exit(code)



@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, dir_okay=False))
@click.argument("output_path", metavar="OUTPUT", type=click.Path(dir_okay=False))
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False),
              help="Model folder (default: the shipped models/ashrae-lgbm).")
@click.option("--buildings", "buildings_csv", type=click.Path(exists=True, dir_okay=False),
              help="Building metadata CSV (default: the bundled data/building_metadata.csv).")
@click.option("--threshold", type=float, help="Anomaly threshold on the score (default: the model's).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def score(input_path: str, output_path: str, model_dir: str | None, buildings_csv: str | None,
          threshold: float | None, quiet: bool) -> None:
    """Score a CSV or CSV.GZ of readings in the ASHRAE columns, in time order, learning each
    meter as the gateway would. OUTPUT gets the input columns plus expected_model, expected,
    anomaly_score and anomaly; rejected rows are counted with their reasons on stderr."""
    from gateway.model.paths import default_buildings, default_model
    from gateway.model.score_file import score_file

    model_dir = model_dir or default_model()
    buildings_csv = buildings_csv or default_buildings()
    if model_dir is None:
        _fail(GatewayError("no model: give --model (no shipped models/ashrae-lgbm was found)"))
    if buildings_csv is None:
        _fail(GatewayError("no building metadata: give --buildings"))
    try:
        result = score_file(input_path, output_path, model_dir, buildings_csv, progress=not quiet,
                            threshold=threshold)
    except GatewayError as exc:
        _fail(exc)
    click.echo(f"{output_path}: {result['scored']:,} readings scored with {result['model_version']}, "
               f"{result['anomalies']:,} flagged, in {result['seconds']:.1f} s")
    if result["rejected"]:
        click.echo(f"{result['rejected']:,} row{'s' if result['rejected'] != 1 else ''} rejected:", err=True)
        for reason, n in sorted(result["rejected_reasons"].items(), key=lambda kv: -kv[1]):
            click.echo(f"  {n:,} × {reason}", err=True)
        for line, reason in result["rejected_rows"][:10]:
            click.echo(f"  line {line}: {reason}", err=True)


@main.group("buffer")
def buffer_group() -> None:
    """Look after buffer files."""


@buffer_group.command("recover")
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
def buffer_recover(src: str, dst: str) -> None:
    """Salvage every readable row of the damaged buffer SRC into the new buffer file DST, and
    count per table what was saved and what was lost. SRC is only read; the gateway must be
    stopped (this takes SRC's lock)."""
    from gateway.recover import recover

    try:
        result = recover(src, dst)
    except GatewayError as exc:
        _fail(exc)
    click.echo(f"recovered {src} into {dst}:")
    for line in result.lines():
        click.echo(f"  {line}")
    click.echo(f"point buffer.path at {dst} to use it (moving it over {src} would meet {src}'s old WAL)")


# What `gateway model train` and `gateway model quality` import, and the extra that installs it.
TRAIN_EXTRA_MODULES = ("lightgbm", "onnxmltools", "onnx", "sklearn")
#: The `gateway model` commands that need the train extra: name → (module, command object).
TRAIN_COMMANDS = {"train": ("gateway.model.train", "train_command"),
                  "quality": ("gateway.model.quality", "quality_command")}


class _ModelGroup(click.Group):
    """``gateway model``: ``train`` and ``quality`` are looked up only when asked for, so nothing is
    imported at start-up, and without the ``train`` extra they say so instead of a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *TRAIN_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in TRAIN_COMMANDS:
            return super().get_command(ctx, name)
        import importlib

        module, attr = TRAIN_COMMANDS[name]
        command = getattr(importlib.import_module(module), attr)

        def checked(**kwargs):
            for extra in TRAIN_EXTRA_MODULES:
                try:
                    importlib.import_module(extra)
                except ImportError:
                    _fail(GatewayError(f"gateway model {name} needs the train extra ({extra} is missing): "
                                       "pip install 'meter-gateway[train]'"))
            return command.callback(**kwargs)

        return click.Command(name, params=command.params, callback=checked, help=command.help,
                             short_help=command.short_help)


@main.group(cls=_ModelGroup)
def model() -> None:
    """Train and check models."""


@model.command("check")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
def model_check(model_dir: str) -> None:
    """Load MODEL_DIR and run every check a hot swap runs (metadata, golden vectors)."""
    from gateway.model.scorer import Scorer

    try:
        s = Scorer(model_dir)
    except GatewayError as exc:
        _fail(exc)
    click.echo(f"{model_dir}: ok, version {s.version}")


@model.command("publish")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--root", type=click.Path(file_okay=False),
              help="A local nucleus's root (the emulator's, or /greengrass/v2): deploy the new version there.")
@click.option("--version", "version", help="The component version (default with --root: the next patch of the "
                                            "one the nucleus runs; required for AWS).")
@click.option("--run", "run_steps", is_flag=True, help="On AWS: run the gdk publish and create-deployment steps "
                                                       "instead of printing them.")
@click.option("--workdir", default="var/publish", show_default=True, type=click.Path(file_okay=False),
              help="Where the staged project and its greengrass-build/ go.")
@click.option("--deployment", "deployment_template", type=click.Path(exists=True, dir_okay=False),
              help="The create-deployment input to update (default: cloud/deployment.json).")
def model_publish(model_dir: str, root: str | None, version: str | None, run_steps: bool, workdir: str,
                  deployment_template: str | None) -> None:
    """Build MODEL_DIR as the next org.metergateway.Model component version; deploy it to a local
    nucleus (--root), or print (--run: run) the gdk publish and create-deployment steps for AWS."""
    from gateway.model.publish import publish

    try:
        p = publish(model_dir, workdir=workdir, root=root, version=version, run=run_steps,
                    deployment_template=deployment_template)
    except GatewayError as exc:
        _fail(exc)
    click.echo(f"built {p.component} {p.version} (model {p.model}): --recipeDir {p.recipes} --artifactDir {p.artifacts}")
    if p.deployment:
        click.echo(f"deployed {p.component}={p.version} on {root}: deployment {p.deployment} SUCCEEDED")
    elif not run_steps:
        click.echo("to publish and deploy on AWS:")
        for step in p.steps:
            click.echo(f"  {step}")


@main.command()
@click.option("--from", "source", required=True, metavar="s3://BUCKET/PREFIX|DIR|CSV",
              help="The analytics store (as `gateway model train --from`).")
@click.option("--workdir", default="var/cycle", show_default=True, type=click.Path(file_okay=False),
              help="Challengers, the cycles.jsonl record, the lock and the staged builds.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="A YAML file with a cycle: mapping (metric, margin, tolerance, holdout_buildings, ...).")
@click.option("--champion", "champion_dir", type=click.Path(exists=True, file_okay=False),
              help="The model in service (default: the nucleus's, the last promoted, or the shipped one).")
@click.option("--root", type=click.Path(file_okay=False), help="A local nucleus: deploy a promoted model there.")
@click.option("--aws", is_flag=True, help="Make the AWS publish and deployment steps for a promoted model.")
@click.option("--run", "run_aws", is_flag=True, help="With --aws: run those steps.")
@click.option("--version", "version", help="The component version to publish (default with --root: next patch).")
@click.option("--buildings", "buildings_csv", type=click.Path(exists=True, dir_okay=False),
              help="building_metadata.csv (default: the bundled one).")
@click.option("--weather", type=click.Path(exists=True, dir_okay=False), help="The weather feed's messages to join.")
@click.option("--margin", type=float, help="Overrides cycle.margin.")
@click.option("--metric", help="Overrides cycle.metric.")
def cycle(source: str, workdir: str, config_path: str | None, champion_dir: str | None, root: str | None, aws: bool,
          run_aws: bool, version: str | None, buildings_csv: str | None, weather: str | None, margin: float | None,
          metric: str | None) -> None:
    """Train → compare → publish → deploy, once: train a challenger on the analytics store, compare it
    with the model in service on held-out buildings and days, and ship it only when it is better by
    the margin (else record it). Ends with one `cycle: promoted=OLD->NEW ...` or `cycle: kept=...` line."""
    from gateway.model.cycle import CycleConfig, run as run_cycle

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = CycleConfig.load(config_path) if config_path else CycleConfig()
        overrides = {k: v for k, v in (("margin", margin), ("metric", metric)) if v is not None}
        if overrides:
            from dataclasses import asdict

            config = CycleConfig.from_dict({**asdict(config), **overrides})
        result = run_cycle(source, workdir, config=config, champion_dir=champion_dir, root=root,
                           buildings_csv=buildings_csv, weather=weather, aws=aws, version=version, run_aws=run_aws)
    except GatewayError as exc:
        _fail(exc, config_path)
    for step in result.steps if not run_aws else []:
        click.echo(f"  {step}")
    click.echo(result.line())


@main.command()
@click.option("--component", type=click.Choice(["gateway", "model"]), default="gateway", show_default=True,
              help="Which component to build.")
@click.option("--platform", help="The device's pip platform tag, e.g. manylinux2014_aarch64 (default: this machine).")
@click.option("--python-version", help="The device's Python, e.g. 3.11 (default: this one).")
@click.option("--version", "version", help="The component version (default: gdk-config.json's, e.g. NEXT_PATCH).")
def build(component: str, platform: str | None, python_version: str | None, version: str | None) -> None:
    """Build a component's greengrass-build/ folder, as `gdk component build` does."""
    from release.build import BuildError, build as build_component

    try:
        built = build_component(component, platform=platform, python_version=python_version, version=version)
    except BuildError as exc:
        _fail(GatewayError(str(exc)))
    click.echo(f"built {built.component} {built.version}")


@main.group()
def simulate() -> None:
    """Run simulated devices for a gateway to read."""


@simulate.command("modbus")
@click.option("--meters", type=int, default=None,
              help="How many meters [default: 100; with --replay, the file's meters].")
@click.option("--ports", type=int, default=1, show_default=True, help="TCP ports (247 unit ids each).")
@click.option("--base-port", type=int, default=5020, show_default=True, help="The first port (0: any free ones).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--map", "map_name", default="eastron-sdm630", show_default=True,
              help="Register map of every meter (a shipped name or a file).")
@click.option("--maps", "maps_mode", type=click.Choice(["mixed"]), help="mixed: the shipped maps in turn.")
@click.option("--replay", type=click.Path(exists=True, dir_okay=False),
              help="Counters from this ASHRAE-columns file (hourly) instead of the simulator's shapes.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--speed", type=float, default=None, help="Fleet time runs this many times faster than the clock.")
@click.option("--timeout", "timeouts", multiple=True, metavar="P:U",
              help="Meter at port index P, unit U never answers (repeatable).")
@click.option("--exception", "exceptions", multiple=True, metavar="P:U[=CODE]",
              help="Meter answers Modbus exception CODE (default --exception-code) (repeatable).")
@click.option("--reset", "resets", multiple=True, metavar="P:U[=SECONDS]",
              help="Meter's counter goes to 0 SECONDS of fleet time after the start (default 60) (repeatable).")
@click.option("--rollover", "rollovers", multiple=True, metavar="P:U",
              help="Meter's counters start just below their wrap (repeatable).")
@click.option("--timeout-rate", type=float, default=0.0, show_default=True, help="Share of requests not answered.")
@click.option("--exception-rate", type=float, default=0.0, show_default=True,
              help="Share of requests answered with an exception.")
@click.option("--exception-code", type=int, default=4, show_default=True, help="The exception code injected.")
@click.option("--reset-rate", type=float, default=0.0, show_default=True,
              help="Chance per meter per interval that its counter goes to 0.")
@click.option("--rollover-rate", type=float, default=0.0, show_default=True,
              help="Share of meters whose counters start just below their wrap.")
@click.option("--log", "log_path", type=click.Path(dir_okay=False), default="var/modbus-fleet/injected.jsonl",
              show_default=True, help="What was injected (.csv: CSV, else JSON lines).")
@click.option("--devices-csv", type=click.Path(dir_okay=False), default="var/modbus-fleet/devices.csv",
              show_default=True, help="Where to write the devices CSV a gateway's modbus source reads.")
def simulate_modbus(meters, ports, base_port, host, map_name, maps_mode, replay, seed, speed, timeouts, exceptions,
                    resets, rollovers, timeout_rate, exception_rate, exception_code, reset_rate, rollover_rate,
                    log_path, devices_csv) -> None:
    """Serve a simulated fleet of Modbus TCP meters (cumulative energy counters and power in the
    shipped register maps' layouts) until Ctrl-C or SIGTERM."""
    import threading

    from emulator.modbus_fleet import FleetServer, parse_targets
    from gateway.registermap import shipped

    try:
        fleet = FleetServer(
            meters=meters if meters is not None or replay else 100, ports=ports, base_port=base_port, host=host,
            maps=shipped() if maps_mode == "mixed" else [map_name], replay=replay, seed=seed, speed=speed,
            timeouts=[(p, u) for p, u, _ in parse_targets(timeouts, "--timeout")],
            exceptions={(p, u): int(a) if a else None for p, u, a in parse_targets(exceptions, "--exception")},
            resets={(p, u): float(a) if a else 60.0 for p, u, a in parse_targets(resets, "--reset")},
            rollovers=[(p, u) for p, u, _ in parse_targets(rollovers, "--rollover")],
            timeout_rate=timeout_rate, exception_rate=exception_rate, exception_code=exception_code,
            reset_rate=reset_rate, rollover_rate=rollover_rate, log_path=log_path, devices_csv=devices_csv,
        )
        fleet.start()
    except (GatewayError, ValueError) as exc:
        _fail(exc)
    first, last = fleet.ports[0], fleet.ports[-1]
    click.echo(f"serving {len(fleet.devices)} meters on {host}:{first}" + (f"..{last}" if last != first else "")
               + f"; devices in {devices_csv}, injections logged to {log_path}")
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        fleet.stop()
    click.echo(f"stopped: {fleet.requests:,} requests served, {len(fleet.injected):,} faults injected")


def _emulator_command(name: str, target: str) -> click.Command:
    """The command ``module:attribute`` of the local emulation, imported now; a clear error where
    it is not installed (a device has no ``emulator`` package)."""
    import importlib

    module, attr = target.split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        raise click.ClickException(f"gateway {name} is part of the local emulation, which is not installed "
                                   f"here ({exc}); install the project with its emulator extra") from None


class _NucleusGroup(click.Group):
    """``gateway nucleus``: the local Greengrass nucleus of :mod:`emulator.nucleus.cli`, imported
    only when the command is used (the emulator is never needed on a device)."""

    def __init__(self) -> None:
        super().__init__("nucleus", help="Run a local Greengrass nucleus, or manage the one on --root "
                                         "(greengrass-cli's verbs).")

    @staticmethod
    def _real() -> click.Group:
        return _emulator_command("nucleus", "emulator.nucleus.cli:nucleus")

    @property  # type: ignore[override]
    def commands(self) -> dict:
        return self._real().commands

    @commands.setter
    def commands(self, value: dict) -> None:
        pass

    def make_context(self, info_name, args, parent=None, **extra):
        return self._real().make_context(info_name, args, parent=parent, **extra)


main.add_command(_NucleusGroup())


class _LazyCommand(click.Command):
    """A command of the local emulation (``module:attribute``), imported only when it is used: a
    device has no ``emulator`` package, and the rest of ``gateway`` must not need it."""

    def __init__(self, name: str, target: str, help: str) -> None:
        super().__init__(name, help=help, short_help=help)
        self.target = target

    def _real(self) -> click.Command:
        return _emulator_command(self.name, self.target)

    def make_context(self, info_name, args, parent=None, **extra):
        return self._real().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        return self._real().invoke(ctx)


main.add_command(_LazyCommand("dashboard", "emulator.dashboard:command",
                              "Serve the dashboard of an emulated cloud (plots of consumption, anomalies and gateway health)."))


if __name__ == "__main__":
    main()
