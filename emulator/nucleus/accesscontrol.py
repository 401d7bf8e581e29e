"""Who may do what over IPC: each recipe's ``accessControl``, matched as the nucleus matches it.

A component's configuration carries its policies::

    accessControl:
      aws.greengrass.ipc.mqttproxy:             # the destination (an IPC service)
        org.metergateway.Gateway:mqttproxy:1:   # a policy id
          operations: [aws.greengrass#PublishToIoTCore]
          resources: ["dt/meters/{iot:thingName}/#"]

A request is allowed when one of the principal's policies for that destination names the
operation (or ``*``) and a resource that matches. Resources match as in the Java nucleus
(``authorization/WildcardTrie``):

- ``*`` anywhere matches any run of characters (``/`` included); ``*`` alone matches everything.
- ``${*}``, ``${?}``, ``${$}`` stand for the literal characters ``*``, ``?``, ``$``.
- For the MQTT proxy (``aws.greengrass.ipc.mqttproxy``) the resources are MQTT-style as well: a
  ``+`` that fills a whole level matches one level, a trailing ``/#`` matches the parent level
  and everything below it, ``#`` alone matches everything. A ``+`` or ``#`` inside a level is a
  literal character. The requested resource (a topic filter, for subscribe) is matched as a
  string, so the policy ``a/+`` allows subscribing to ``a/+`` and ``a/x`` but not ``a/#``.
- Recipe variables in resources are replaced before matching: ``{iot:thingName}``, plus any the
  caller gives (the runner knows the component's own ``{configuration:/path}`` values).

Which operations are checked is the nucleus's choice, kept in :data:`AUTHORIZED`: the MQTT
proxy, local pub/sub, pause/resume, and the Greengrass CLI's IPC service; configuration,
``UpdateState`` and the component-update operations are not authorized by the nucleus.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

MQTT_PROXY = "aws.greengrass.ipc.mqttproxy"
PUBSUB = "aws.greengrass.ipc.pubsub"
LIFECYCLE = "aws.greengrass.ipc.lifecycle"
CLI = "aws.greengrass.Cli"

# operation -> destination service whose policies authorize it
AUTHORIZED = {
    "aws.greengrass#PublishToIoTCore": MQTT_PROXY,
    "aws.greengrass#SubscribeToIoTCore": MQTT_PROXY,
    "aws.greengrass#PublishToTopic": PUBSUB,
    "aws.greengrass#SubscribeToTopic": PUBSUB,
    "aws.greengrass#PauseComponent": LIFECYCLE,
    "aws.greengrass#ResumeComponent": LIFECYCLE,
    "aws.greengrass#CreateLocalDeployment": CLI,
    "aws.greengrass#ListLocalDeployments": CLI,
    "aws.greengrass#GetLocalDeploymentStatus": CLI,
    "aws.greengrass#ListComponents": CLI,
    "aws.greengrass#GetComponentDetails": CLI,
    "aws.greengrass#RestartComponent": CLI,
    "aws.greengrass#StopComponent": CLI,
    "aws.greengrass#CreateDebugPassword": CLI,
}

_VARIABLE = re.compile(r"\{([A-Za-z_]+:[^{}]+)\}")
_ESCAPE = re.compile(r"\$\{(.)\}")


class PolicyError(ValueError):
    """An accessControl block that is not of the recipe's shape; the message names the path."""


def _compile(resource: str, mqtt: bool) -> re.Pattern[str]:
    """The regular expression a policy resource stands for."""
    if resource == "*" or (mqtt and resource == "#"):
        return re.compile(r".*", re.S)
    if mqtt and resource == "+":
        return re.compile(r"[^/]*")
    out = []
    i, n = 0, len(resource)
    while i < n:
        c = resource[i]
        m = _ESCAPE.match(resource, i)
        if m:
            out.append(re.escape(m.group(1)))
            i = m.end()
            continue
        if c == "*":
            out.append(".*")
        elif mqtt and c == "+" and (i == 0 or resource[i - 1] == "/") and (i == n - 1 or resource[i + 1] == "/"):
            out.append("[^/]*")
        elif mqtt and c == "#" and i == n - 1 and i > 0 and resource[i - 1] == "/":
            # "a/#" matches "a" and everything under it: take back the "/" already emitted
            out[-1] = "(?:/.*)?"
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.S)


def substitute(resource: str, variables: Mapping[str, str]) -> str:
    """Replace recipe variables (``{iot:thingName}``) that ``variables`` knows; leave others."""
    return _VARIABLE.sub(lambda m: variables.get(m.group(1), m.group(0)), resource)


@dataclass(frozen=True)
class Policy:
    policy_id: str
    destination: str
    operations: frozenset[str]
    resources: tuple[str, ...]
    _patterns: tuple[re.Pattern[str], ...] = field(default=(), compare=False, repr=False)

    def allows(self, operation: str, resource: str | None) -> bool:
        if "*" not in self.operations and operation not in self.operations:
            return False
        if resource is None:
            return True
        return any(p.fullmatch(resource) for p in self._patterns)


def parse(access_control: Mapping | None, variables: Mapping[str, str] | None = None,
          where: str = "accessControl") -> list[Policy]:
    """The policies of one component's ``accessControl`` mapping, variables substituted."""
    variables = variables or {}
    policies: list[Policy] = []
    if not access_control:
        return policies
    if not isinstance(access_control, Mapping):
        raise PolicyError(f"{where}: expected a mapping of IPC service to policies, got {type(access_control).__name__}")
    for destination, by_id in access_control.items():
        if not isinstance(by_id, Mapping):
            raise PolicyError(f"{where}.{destination}: expected a mapping of policy id to policy")
        for policy_id, body in by_id.items():
            path = f"{where}.{destination}.{policy_id}"
            if not isinstance(body, Mapping):
                raise PolicyError(f"{path}: expected a mapping with operations and resources")
            ops = body.get("operations")
            res = body.get("resources", [])
            if not isinstance(ops, list) or not ops or not all(isinstance(o, str) for o in ops):
                raise PolicyError(f"{path}.operations: expected a non-empty list of operation names")
            if not isinstance(res, list) or not all(isinstance(r, str) for r in res):
                raise PolicyError(f"{path}.resources: expected a list of strings")
            resources = tuple(substitute(r, variables) for r in res)
            mqtt = destination == MQTT_PROXY
            policies.append(Policy(str(policy_id), str(destination), frozenset(ops), resources,
                                   tuple(_compile(r, mqtt) for r in resources)))
    return policies


class AccessDenied(Exception):
    """The nucleus's wording: ``Principal P is not authorized to perform D:O on resource R``."""


@dataclass
class AccessControl:
    """Every component's policies; :meth:`check` raises :class:`AccessDenied` or returns."""

    _by_principal: dict[str, list[Policy]] = field(default_factory=dict)

    def set_policies(self, principal: str, policies: list[Policy]) -> None:
        self._by_principal[principal] = list(policies)

    def remove(self, principal: str) -> None:
        self._by_principal.pop(principal, None)

    def is_allowed(self, principal: str, operation: str, resource: str | None) -> bool:
        destination = AUTHORIZED.get(operation)
        if destination is None:
            return True
        return any(p.destination == destination and p.allows(operation, resource)
                   for p in self._by_principal.get(principal, ()))

    def check(self, principal: str, operation: str, resource: str | None) -> None:
        if not self.is_allowed(principal, operation, resource):
            raise AccessDenied(
                f"Principal {principal} is not authorized to perform "
                f"{AUTHORIZED[operation]}:{operation} on resource {resource}")
