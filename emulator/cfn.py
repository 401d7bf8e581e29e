"""CloudFormation templates as the emulated cloud reads them: one source of truth.

The emulation (rules engine, Firehose, Athena, IoT Analytics) runs what ``cloud/*.yaml`` declare,
so it needs two things a plain YAML loader lacks:

- :func:`load_template` reads a template with its short-form tags (``!Sub``, ``!Ref``,
  ``!GetAtt``, ``!Join``, ``!If``, ...) kept as the long-form dicts CloudFormation itself uses
  (``{"Fn::Sub": ...}``, ``{"Ref": ...}``), so nothing is lost or evaluated early;
- :func:`resolve` evaluates those intrinsic functions the way a deployed stack would: parameters
  (their ``Default`` unless ``params`` gives a value), pseudo parameters (``AWS::Region`` is
  ``us-east-1``, ``AWS::AccountId`` ``000000000000``, ``AWS::Partition`` ``aws``,
  ``AWS::StackName``), and resources: ``!Ref`` of a resource is its physical name (the name
  property it sets, e.g. a delivery stream's ``DeliveryStreamName``, or ``params[logical id]``,
  which is how the emulation names the data bucket ``metergateway-data``); ``!GetAtt X.Arn`` is
  an ARN built from that name::

    template = load_template("cloud/analytics.yaml")
    rule = template["Resources"]["RawRule"]["Properties"]
    resolve(rule["RuleName"], template=template)                      # 'metergateway_raw'
    resolve({"Ref": "DataBucket"}, {"DataBucket": "metergateway-data"}, template=template)

Only what the templates use is supported; anything else raises :class:`TemplateError` naming it.
"""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from typing import Any

import yaml

__all__ = ["TemplateError", "load_template", "resolve", "PSEUDO", "resource_name"]

#: Pseudo parameters as the emulation's one account and Region have them.
PSEUDO = {
    "AWS::Region": "us-east-1",
    "AWS::AccountId": "000000000000",
    "AWS::Partition": "aws",
    "AWS::StackName": "metergateway",
    "AWS::URLSuffix": "amazonaws.com",
    "AWS::NoValue": None,
}

# Short tag -> long form. !Ref and !Condition keep their own names.
_TAGS = {
    "Ref": "Ref", "Condition": "Condition", "Sub": "Fn::Sub", "GetAtt": "Fn::GetAtt", "Join": "Fn::Join",
    "If": "Fn::If", "Select": "Fn::Select", "Split": "Fn::Split", "Equals": "Fn::Equals", "Not": "Fn::Not",
    "And": "Fn::And", "Or": "Fn::Or", "FindInMap": "Fn::FindInMap", "Base64": "Fn::Base64",
    "GetAZs": "Fn::GetAZs", "ImportValue": "Fn::ImportValue", "Cidr": "Fn::Cidr",
}

# The property that names a resource of each type, where the templates set one.
_NAME_PROPERTY = {
    "AWS::S3::Bucket": "BucketName",
    "AWS::Logs::LogGroup": "LogGroupName",
    "AWS::Logs::LogStream": "LogStreamName",
    "AWS::IAM::Role": "RoleName",
    "AWS::KinesisFirehose::DeliveryStream": "DeliveryStreamName",
    "AWS::IoT::TopicRule": "RuleName",
    "AWS::IoT::Thing": "ThingName",
    "AWS::IoT::Policy": "PolicyName",
    "AWS::IoTAnalytics::Channel": "ChannelName",
    "AWS::IoTAnalytics::Datastore": "DatastoreName",
    "AWS::IoTAnalytics::Pipeline": "PipelineName",
    "AWS::IoTAnalytics::Dataset": "DatasetName",
    "AWS::Athena::WorkGroup": "Name",
    "AWS::Athena::NamedQuery": "Name",
}

# ARN of a resource type from its name: (service, resource part).
_ARN = {
    "AWS::S3::Bucket": ("s3", "{name}"),
    "AWS::Logs::LogGroup": ("logs", "log-group:{name}:*"),
    "AWS::IAM::Role": ("iam", "role/{name}"),
    "AWS::KinesisFirehose::DeliveryStream": ("firehose", "deliverystream/{name}"),
    "AWS::IoT::TopicRule": ("iot", "rule/{name}"),
    "AWS::IoTAnalytics::Channel": ("iotanalytics", "channel/{name}"),
    "AWS::IoTAnalytics::Datastore": ("iotanalytics", "datastore/{name}"),
}


class TemplateError(ValueError):
    """A template the emulation cannot read or resolve, with where and why."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that turns CloudFormation short-form tags into their long-form dicts."""


def _construct(long_name: str):
    def construct(loader: _Loader, node: yaml.Node) -> dict:
        if isinstance(node, yaml.ScalarNode):
            value: Any = loader.construct_scalar(node)
            if long_name == "Fn::GetAtt":
                value = value.split(".", 1)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)
        return {long_name: value}
    return construct


for _short, _long in _TAGS.items():
    _Loader.add_constructor(f"!{_short}", _construct(_long))


def load_template(path: str | os.PathLike) -> dict:
    """The template at ``path`` as a dict, short-form tags kept as long-form dicts."""
    p = Path(path)
    try:
        data = yaml.load(p.read_text(), Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except OSError as exc:
        raise TemplateError(f"{p}: cannot read the template: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise TemplateError(f"{p}: not a valid template: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("Resources"), dict):
        raise TemplateError(f"{p}: a template needs a Resources mapping")
    return data


def resource_name(logical_id: str, params: dict | None = None, *, template: dict) -> str:
    """The physical name of resource ``logical_id``: ``params[logical_id]``, else its name
    property, else ``<stack name>-<logical id>`` in lower case (as CloudFormation generates one)."""
    params = params or {}
    if logical_id in params:
        return params[logical_id]
    res = template.get("Resources", {}).get(logical_id)
    if res is None:
        raise TemplateError(f"no resource or parameter named {logical_id!r}")
    prop = _NAME_PROPERTY.get(res.get("Type"))
    props = res.get("Properties") or {}
    if prop and prop in props:
        return str(resolve(props[prop], params, template=template))
    stack = params.get("AWS::StackName", PSEUDO["AWS::StackName"])
    return f"{stack}-{logical_id}".lower()


def _ref(name: str, params: dict, template: dict) -> Any:
    if name in params:
        return params[name]
    if name in PSEUDO:
        return PSEUDO[name]
    declared = (template.get("Parameters") or {}).get(name)
    if declared is not None:
        if "Default" not in declared:
            raise TemplateError(f"parameter {name} has no Default: give it in params")
        return declared["Default"]
    return resource_name(name, params, template=template)


def _get_att(logical_id: str, attribute: str, params: dict, template: dict) -> str:
    res = template.get("Resources", {}).get(logical_id)
    if res is None:
        raise TemplateError(f"!GetAtt {logical_id}.{attribute}: no resource {logical_id}")
    name = resource_name(logical_id, params, template=template)
    if attribute != "Arn":
        return name
    service, part = _ARN.get(res["Type"], (res["Type"].split("::")[1].lower(), "{name}"))
    partition = params.get("AWS::Partition", PSEUDO["AWS::Partition"])
    if service in ("s3", "iam"):
        region = account = ""
        if service == "iam":
            account = params.get("AWS::AccountId", PSEUDO["AWS::AccountId"])
    else:
        region = params.get("AWS::Region", PSEUDO["AWS::Region"])
        account = params.get("AWS::AccountId", PSEUDO["AWS::AccountId"])
    return f"arn:{partition}:{service}:{region}:{account}:{part.format(name=name)}"


_SUB_VAR = re.compile(r"\$\{([^}]*)\}")


def _sub(text: str, variables: dict, params: dict, template: dict) -> str:
    def one(m: re.Match) -> str:
        name = m.group(1)
        if name.startswith("!"):  # ${!Literal} is the literal text ${Literal}
            return "${" + name[1:] + "}"
        if name in variables:
            return str(resolve(variables[name], params, template=template))
        if "." in name:
            logical, attribute = name.split(".", 1)
            return _get_att(logical, attribute, params, template)
        return str(_ref(name, params, template))
    return _SUB_VAR.sub(one, text)


def resolve(value: Any, params: dict | None = None, *, template: dict | None = None) -> Any:
    """``value`` with every intrinsic function evaluated (see the module doc).

    ``params`` holds parameter values, pseudo parameter overrides (``"AWS::Region"``) and
    physical names of resources by logical id. ``template`` is where parameters' defaults and
    resources are looked up (needed for ``!Ref`` of either)."""
    params = params or {}
    template = template or {}
    if isinstance(value, list):
        return [resolve(v, params, template=template) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (key, arg), = value.items()
        if key == "Ref":
            return _ref(arg, params, template)
        if key == "Fn::Sub":
            if isinstance(arg, str):
                return _sub(arg, {}, params, template)
            text, variables = arg
            return _sub(text, variables, params, template)
        if key == "Fn::GetAtt":
            logical, attribute = arg if isinstance(arg, list) else arg.split(".", 1)
            return _get_att(logical, resolve(attribute, params, template=template), params, template)
        if key == "Fn::Join":
            sep, items = arg
            return str(sep).join(str(v) for v in resolve(items, params, template=template))
        if key == "Fn::Select":
            index, items = resolve(arg, params, template=template)
            return items[int(index)]
        if key == "Fn::Split":
            sep, text = resolve(arg, params, template=template)
            return text.split(sep)
        if key == "Fn::Base64":
            return base64.b64encode(str(resolve(arg, params, template=template)).encode()).decode()
        if key == "Fn::If":
            condition, if_true, if_false = arg
            chosen = if_true if _condition(condition, params, template) else if_false
            return resolve(chosen, params, template=template)
        if key in ("Fn::Equals", "Fn::Not", "Fn::And", "Fn::Or", "Condition"):
            return _evaluate_condition(value, params, template)
        if key.startswith("Fn::"):
            raise TemplateError(f"{key} is not supported by the emulation")
    return {k: resolve(v, params, template=template) for k, v in value.items()}


def _condition(name: str, params: dict, template: dict) -> bool:
    conditions = template.get("Conditions") or {}
    if name not in conditions:
        raise TemplateError(f"no condition named {name!r}")
    return bool(_evaluate_condition(conditions[name], params, template))


def _evaluate_condition(value: Any, params: dict, template: dict) -> bool:
    (key, arg), = value.items()
    if key == "Condition":
        return _condition(arg, params, template)
    if key == "Fn::Equals":
        a, b = resolve(arg, params, template=template)
        return str(a) == str(b)
    if key == "Fn::Not":
        return not _evaluate_condition(arg[0], params, template)
    if key == "Fn::And":
        return all(_evaluate_condition(c, params, template) for c in arg)
    if key == "Fn::Or":
        return any(_evaluate_condition(c, params, template) for c in arg)
    return bool(resolve(value, params, template=template))
