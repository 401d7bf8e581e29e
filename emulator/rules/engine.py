"""The rules engine: the topic rules of ``cloud/*.yaml``, run on every message.

:class:`RulesEngine` reads every ``AWS::IoT::TopicRule`` of the templates it is given (through
:mod:`emulator.cfn`, so the templates stay the one source of truth), parses each rule's SQL once
(:mod:`emulator.rules.sql`) and builds its actions (:mod:`emulator.rules.actions`)::

    engine = RulesEngine(["cloud/analytics.yaml"], Actions(firehose=..., republish=..., s3=root / "s3",
                         logs=root / "logs"), params={"DataBucket": "metergateway-data"})
    engine.handle("dt/meters/15/gw-1/raw", payload, client_id="gw-1")

:meth:`RulesEngine.handle` evaluates every enabled rule whose ``FROM`` filter matches the topic,
and runs the actions of each rule whose ``WHERE`` holds with its SELECT output. A message sent to
the Basic Ingest topic ``$aws/rules/<rule name>/<topic>`` reaches only that rule (whatever its
``FROM``), with ``topic()`` the topic after the prefix, as in IoT Core. When actions fail, the
rule's error action gets one message listing them (:func:`emulator.rules.actions.error_message`).

A rule is refused at load, with an error naming it, when its ``AwsIotSqlVersion`` is not
``2016-03-23`` (the only version emulated), its SQL does not parse (an unquoted ``FROM`` among
others), or an action is one the emulation does not have. :mod:`emulator.rules.binding` connects
an engine to the local broker; :func:`measure` times it on the raw-reading rule.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from emulator.cfn import load_template, resolve
from emulator.rules.actions import Action, ActionFailed, Actions, build_action, error_message
from emulator.rules.sql import Context, SqlError, Statement, parse

__all__ = ["RulesEngine", "Rule", "RuleError", "Actions", "SQL_VERSION", "ANALYTICS", "LEGACY", "measure"]

log = logging.getLogger(__name__)

SQL_VERSION = "2016-03-23"
CLOUD = Path(__file__).resolve().parents[2] / "cloud"
ANALYTICS = CLOUD / "analytics.yaml"
LEGACY = CLOUD / "legacy-iot-analytics.yaml"
BASIC_INGEST = "$aws/rules/"
#: The emulation's name for analytics.yaml's DataBucket (the contract's bucket).
DEFAULT_PARAMS = {"DataBucket": "metergateway-data"}


class RuleError(ValueError):
    """A topic rule the engine cannot run, naming the rule and the template."""


@dataclass
class Rule:
    """One topic rule, ready to run."""

    logical_id: str
    name: str
    statement: Statement
    actions: list[Action]
    error_action: Action | None = None
    enabled: bool = True
    source: str = ""

    def run(self, ctx: Context) -> tuple[bool, list[dict]]:
        """Evaluate the rule on one message: (whether its WHERE took it, the failures)."""
        output = self.statement.evaluate(ctx)
        if output is None:
            return False, []
        failures = []
        for action in self.actions:
            try:
                action.run(ctx, output.value)
            except ActionFailed as exc:
                failures.append(exc.failure)
        return True, failures


@dataclass
class Stats:
    messages: int = 0          # messages handled
    evaluations: int = 0       # (message, rule) pairs whose FROM matched
    fired: int = 0             # ... and whose WHERE held
    action_failures: int = 0   # failed actions (each reported to its rule's error action)
    error_action_failures: int = 0
    dropped: int = 0           # Basic Ingest to a rule that does not exist or is disabled


class RulesEngine:
    """Every topic rule of ``templates`` (see the module doc).

    ``params`` resolves the templates (parameters, pseudo parameters, resource names by logical
    id; the data bucket defaults to ``metergateway-data``); ``rules``, when given, keeps only the
    rules with those logical ids or names; ``clock`` gives ``timestamp()`` (seconds)."""

    def __init__(self, templates: Iterable[str | os.PathLike] = (ANALYTICS,), actions: Actions | None = None,
                 params: dict | None = None, *, rules: Iterable[str] | None = None,
                 clock: Callable[[], float] = time.time):
        self.actions = actions if actions is not None else Actions()
        self.params = {**DEFAULT_PARAMS, **(params or {})}
        self.clock = clock
        self.rules: list[Rule] = []
        wanted = set(rules) if rules is not None else None
        for path in templates:
            self.rules.extend(self._load(Path(path), wanted))
        if wanted is not None:
            missing = wanted - {r.logical_id for r in self.rules} - {r.name for r in self.rules}
            if missing:
                raise RuleError(f"no topic rule {', '.join(sorted(missing))} in {', '.join(map(str, templates))}")
        self.by_name = {r.name: r for r in self.rules}
        self.stats = Stats()
        self._lock = threading.Lock()

    # -- loading
    def _load(self, path: Path, wanted: set | None) -> list[Rule]:
        template = load_template(path)
        out = []
        for logical_id, res in template["Resources"].items():
            if res.get("Type") != "AWS::IoT::TopicRule":
                continue
            props = resolve(res.get("Properties") or {}, self.params, template=template)
            name = props.get("RuleName") or logical_id
            if wanted is not None and logical_id not in wanted and name not in wanted:
                continue
            out.append(self._rule(logical_id, name, props.get("TopicRulePayload") or {}, f"{path.name}:{logical_id}"))
        return out

    def _rule(self, logical_id: str, name: str, payload: dict, source: str) -> Rule:
        where = f"rule {name} ({source})"
        version = payload.get("AwsIotSqlVersion")
        if version != SQL_VERSION:
            raise RuleError(f"{where}: AwsIotSqlVersion is {version!r}; the emulation runs SQL version "
                            f"{SQL_VERSION!r} only")
        try:
            statement = parse(payload.get("Sql", ""))
        except SqlError as exc:
            raise RuleError(f"{where}: {exc}") from None
        if statement.topic_filter is None:
            raise RuleError(f"{where}: the SQL has no FROM '<topic filter>'")
        try:
            actions = [build_action(name, a, self.actions) for a in payload.get("Actions") or []]
            error = payload.get("ErrorAction")
            error_action = build_action(name, error, self.actions) if error else None
        except (ValueError, SqlError) as exc:
            raise RuleError(f"{where}: {exc}") from None
        return Rule(logical_id, name, statement, actions, error_action,
                    enabled=payload.get("RuleDisabled") not in (True, "true"), source=source)

    # -- looking up
    def rule(self, name: str) -> Rule:
        """The rule with this name or logical id."""
        for r in self.rules:
            if name in (r.name, r.logical_id):
                return r
        raise KeyError(f"no rule {name!r}; have {[r.name for r in self.rules]}")

    def filters(self) -> list[str]:
        """The distinct FROM filters of the enabled rules (what a broker client subscribes to)."""
        seen: dict[str, None] = {}
        for r in self.rules:
            if r.enabled:
                seen.setdefault(r.statement.topic_filter, None)
        return list(seen)

    # -- running
    def handle(self, topic: str, payload: bytes, client_id: str | None = None) -> int:
        """Run every rule the message reaches; returns how many rules fired (their WHERE held)."""
        now_ms = int(self.clock() * 1000)
        if topic.startswith(BASIC_INGEST):
            rule_name, _, topic = topic[len(BASIC_INGEST):].partition("/")
            rule = self.by_name.get(rule_name)
            if rule is None or not rule.enabled:
                log.warning("rules engine: Basic Ingest to %s: no enabled rule of that name; the message is dropped",
                            rule_name)
                with self._lock:
                    self.stats.messages += 1
                    self.stats.dropped += 1
                return 0
            rules = [rule]
        else:
            rules = [r for r in self.rules if r.enabled and r.statement.matches(topic)]
        ctx = Context.of(topic, bytes(payload), client_id, now_ms)
        fired = failed = error_failed = 0
        for rule in rules:
            took, failures = rule.run(ctx)
            fired += took
            if failures:
                failed += len(failures)
                error_failed += not self._report(rule, ctx, failures)
        with self._lock:
            s = self.stats
            s.messages += 1
            s.evaluations += len(rules)
            s.fired += fired
            s.action_failures += failed
            s.error_action_failures += error_failed
        return fired

    def _report(self, rule: Rule, ctx: Context, failures: list[dict]) -> bool:
        """Give the failures to the rule's error action; False if that fails too (or there is none)."""
        if not ctx.trace_id:
            ctx.trace_id = str(uuid.uuid4())
        message = error_message(rule.name, ctx, failures)
        if rule.error_action is None:
            log.error("rules engine: rule %s has no error action; lost: %s", rule.name, message)
            return False
        try:
            rule.error_action.run(ctx, message)
        except ActionFailed as exc:
            log.error("rules engine: rule %s: its error action failed too (%s); lost: %s",
                      rule.name, exc.failure["errorMessage"], message)
            return False
        return True


def measure(n_messages: int = 2000, *, seed: int = 1) -> float:
    """Readings per second the engine runs through the raw-reading rule (``RawRule``) with its
    Firehose action, into a Firehose that only counts records; messages of 71 to 100 readings,
    as the gateway's forwarder makes them (:func:`gateway.messages.encode`)."""
    from emulator.rules.bench import measure as _measure

    return _measure(n_messages, seed=seed)
