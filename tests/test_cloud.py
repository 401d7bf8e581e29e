"""The CloudFormation templates in cloud/: lint, least privilege, rules against the gateway's topics,
the Athena queries against their files, and the legacy IoT Analytics record.

Templates are read with cfn-lint's own decoder (short-form intrinsics become ``{"Fn::Sub": ...}``).
Policies are checked twice: structurally (no ``*`` in an action, no bare ``*`` resource, a ``*``
only as a whole path segment of an ARN of this account) and by what they allow (the gateway's
policy lets a gateway use its own topics and no other gateway's).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import sqlglot
from cfnlint.api import lint_file
from cfnlint.decode import decode

from gateway.readings import METER_TYPES
from gateway.topics import basic_ingest, check_topic, topic, topic_matches

CLOUD = Path(__file__).resolve().parent.parent / "cloud"
TEMPLATES = sorted(p.name for p in CLOUD.glob("*.yaml"))
LEGACY = "legacy-iot-analytics.yaml"
# cfn-lint's rule for a resource type of a service that was shut down (AWS IoT Analytics, 2025-12-15).
SHUT_DOWN = "E3710"

THING, OTHER = "gw-1", "gw-2"
PREFIX = "metergateway"
CONTEXT = {"AWS::Partition": "aws", "AWS::Region": "eu-west-1", "AWS::AccountId": "123456789012"}
ARN = "arn:aws:iot:eu-west-1:123456789012:"


def load(name: str) -> dict:
    template, matches = decode(str(CLOUD / name))
    assert not matches, f"{name} does not parse: {matches}"
    return template


def resources(template: dict, kind: str) -> dict[str, dict]:
    return {k: r.get("Properties", {}) for k, r in template["Resources"].items() if r["Type"] == kind}


def sub_text(value) -> str:
    """The text of a plain string or a Fn::Sub; GetAtt and Ref as placeholders."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "Fn::Sub" in value:
        sub = value["Fn::Sub"]
        return sub if isinstance(sub, str) else sub[0]
    if isinstance(value, dict) and "Fn::GetAtt" in value:
        att = value["Fn::GetAtt"]
        return "${%s}" % (att if isinstance(att, str) else ".".join(att))
    if isinstance(value, dict) and "Ref" in value:
        return "${%s}" % value["Ref"]
    raise AssertionError(f"unexpected value {value!r}")


def substitute(text: str, values: dict) -> str:
    def one(m: re.Match) -> str:
        name = m.group(1)
        if name.startswith("!"):
            return "${" + name[1:] + "}"
        return values[name]
    return re.sub(r"\$\{([^}]+)\}", one, text)


def policy_documents(template: dict):
    """(where, document) of every IAM and IoT policy document in ``template``."""
    for name, res in template["Resources"].items():
        props = res.get("Properties", {})
        if res["Type"] == "AWS::IAM::Role":
            for p in props.get("Policies", []):
                yield f"{name}.{p['PolicyName']}", p["PolicyDocument"]
        elif res["Type"] in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy", "AWS::IoT::Policy",
                             "AWS::S3::BucketPolicy"):
            yield name, props["PolicyDocument"]


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def iot_match(pattern: str, name: str) -> bool:
    """An IoT policy resource against a resource name: ``*`` matches anything; + and # are literal."""
    return re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), name) is not None


mqtt_match = topic_matches  # an MQTT topic filter (+ one level, # the rest) against a topic


def health_topic(thing: str) -> str:
    return f"dt/meters/gateway/{thing}/health"


# ------------------------------------------------------------------ lint


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_lints_clean(name):
    matches = lint_file(CLOUD / name)
    found = [f"{m.rule.id} {m.message} (line {m.linenumber})" for m in matches
             if not (name == LEGACY and m.rule.id == SHUT_DOWN)]
    assert found == []


def test_only_the_legacy_file_uses_the_shut_down_service():
    """The one ignored rule fires on every IoT Analytics resource of the legacy file, and no
    deployable template holds such a resource."""
    legacy = load(LEGACY)
    flagged = {m.linenumber for m in lint_file(CLOUD / LEGACY) if m.rule.id == SHUT_DOWN}
    analytics = [k for k, r in legacy["Resources"].items() if r["Type"].startswith("AWS::IoTAnalytics::")]
    assert len(flagged) == len(analytics) == 5
    for name in TEMPLATES:
        if name != LEGACY:
            assert not [r for r in load(name)["Resources"].values()
                        if r["Type"].startswith("AWS::IoTAnalytics::")], name


def test_the_legacy_header_says_the_service_ended():
    head = (CLOUD / LEGACY).read_text().split("AWSTemplateFormatVersion")[0]
    assert "IoT Analytics ended on 2025-12-15" in head
    assert "boto3 has no client" in head
    assert "emulat" in head


# ------------------------------------------------------------------ least privilege


def test_every_policy_names_its_actions_and_resources():
    """No * in an action, no bare * resource, no NotAction/NotResource; a * only as a whole
    segment of an ARN in this account and Region, built on the stack's own resources or
    parameters."""
    checked = 0
    for name in TEMPLATES:
        template = load(name)
        known = set(template["Resources"]) | set(template.get("Parameters", {})) | set(CONTEXT)
        for where, doc in policy_documents(template):
            for st in doc["Statement"]:
                label = f"{name} {where} {st.get('Sid', '')}"
                assert "NotAction" not in st and "NotResource" not in st, label
                for action in as_list(st["Action"]):
                    assert "*" not in action, f"{label}: action {action!r}"
                    assert re.fullmatch(r"[a-z0-9-]+:[A-Za-z0-9]+", action), f"{label}: {action!r}"
                for resource in as_list(st.get("Resource", [])):
                    text = sub_text(resource)
                    assert text != "*", f"{label}: bare * resource"
                    for ref in re.findall(r"\$\{([^}!]+)\}", text):
                        assert ref.split(".")[0] in known, f"{label}: {text!r} refers to {ref}"
                    if text.startswith("${") and text.split("}")[0][2:].split(".")[0] in template["Resources"]:
                        rest = text.split("}", 1)[1]  # an ARN of the stack's own resource
                    else:
                        plain = text
                        for pseudo in CONTEXT:
                            plain = plain.replace("${%s}" % pseudo, pseudo.split("::")[1].upper())
                        assert plain.startswith("arn:PARTITION:"), f"{label}: {text!r}"
                        _, _, service, region, account, rest = plain.split(":", 5)
                        if service != "s3":
                            assert region == "REGION", f"{label}: {text!r}"
                            assert account == "ACCOUNTID" or (
                                service == "greengrass" and account == "aws"), f"{label}: {text!r}"
                    for segment in re.split(r"[/:]", rest):
                        assert "*" not in segment or segment == "*", f"{label}: {text!r}"
                    checked += 1
    assert checked > 30


def allowed(statements: list, action: str, name: str) -> bool:
    values = {"ThingName": THING, "RulePrefix": PREFIX, **CONTEXT,
              "TokenExchangeRoleAlias.RoleAliasArn": ARN + "rolealias/x"}
    for st in statements:
        if st["Effect"] == "Allow" and action in as_list(st["Action"]):
            if any(iot_match(substitute(sub_text(r), values), name) for r in as_list(st["Resource"])):
                return True
    return False


def test_gateway_policy_allows_its_own_topics_and_no_other_gateways():
    policy = next(iter(resources(load("thing.yaml"), "AWS::IoT::Policy").values()))
    st = policy["PolicyDocument"]["Statement"]
    for thing, ok in ((THING, True), (OTHER, False)):
        data = [topic("meters", site, thing, kind) for site in ("15", "0") for kind in ("raw", "scored")]
        data += [basic_ingest(t, f"{PREFIX}_raw") for t in data]
        for t in data + [health_topic(thing)]:
            assert check_topic(t) is None, t
            assert allowed(st, "iot:Publish", ARN + "topic/" + t) is ok, t
        for client in (thing, f"{thing}-direct"):
            assert allowed(st, "iot:Connect", ARN + "client/" + client) is ok, client
        receipt = f"cmd/meters/{thing}/receipt"
        assert allowed(st, "iot:Subscribe", ARN + "topicfilter/" + receipt) is ok
        assert allowed(st, "iot:Receive", ARN + "topic/" + receipt) is ok
    assert allowed(st, "iot:Subscribe", ARN + "topicfilter/dt/weather/+/observations")
    assert allowed(st, "iot:Receive", ARN + "topic/dt/weather/15/observations")
    # Nothing beyond the contract: no other data topic, no wildcard subscription, no other rule.
    for t in ("dt/meters/15/gw-1/other", "cmd/meters/gw-1/other", "dt/weather/15/forecast",
              "$aws/rules/other/dt/meters/15/gw-1/raw"):
        assert not allowed(st, "iot:Publish", ARN + "topic/" + t), t
    for f in ("#", "cmd/meters/+/receipt", "dt/meters/+/+/raw"):
        assert not allowed(st, "iot:Subscribe", ARN + "topicfilter/" + f), f
    actions = {a for s in st for a in as_list(s["Action"])}
    assert not [a for a in actions if a.startswith("greengrass:")
                and a not in {"greengrass:ResolveComponentCandidates", "greengrass:GetComponentVersionArtifact",
                              "greengrass:GetDeploymentConfiguration", "greengrass:ListThingGroupsForCoreDevice"}]
    assert "iot:AssumeRoleWithCertificate" in actions


# ------------------------------------------------------------------ topic rules


def rules() -> list[tuple[str, str, dict]]:
    out = []
    for name in TEMPLATES:
        for key, props in resources(load(name), "AWS::IoT::TopicRule").items():
            out.append((name, key, props["TopicRulePayload"]))
    return out


def from_filter(payload: dict) -> str:
    sql = sub_text(payload["Sql"])
    m = re.search(r"\bFROM\s+'([^']+)'", sql)
    assert m, f"no quoted FROM in {sql!r}"
    return m.group(1)


@pytest.mark.parametrize("name,key,payload", rules(), ids=lambda v: v if isinstance(v, str) else "")
def test_rule_has_sql_version_quoted_from_and_error_action(name, key, payload):
    assert payload["AwsIotSqlVersion"] == "2016-03-23"
    from_filter(payload)
    assert payload.get("ErrorAction"), f"{name} {key} has no ErrorAction"
    assert payload.get("Actions")


def test_rules_listen_on_the_gateways_topics():
    """Each rule's FROM filter matches the topics gateway/topics.py builds, and only its kind."""
    by_key = {key: payload for name, key, payload in rules() if name == "analytics.yaml"}
    raw, scored = topic("meters", "15", THING, "raw"), topic("meters", "15", THING, "scored")
    health = health_topic(THING)
    expect = {"RawRule": {raw}, "ScoredRule": {scored}, "ReceiptRule": {raw, scored, health},
              "HealthRule": {health}}
    assert set(by_key) == set(expect)
    for key, matching in expect.items():
        f = from_filter(by_key[key])
        assert {t for t in (raw, scored, health) if mqtt_match(f, t)} == matching, key
    receipt = sub_text(by_key["ReceiptRule"]["Sql"])
    assert re.search(r"WHERE topic\(5\) = 'raw' OR topic\(5\) = 'scored'", receipt)
    legacy = {key: payload for name, key, payload in rules() if name == LEGACY}
    assert len(legacy) == len(METER_TYPES)
    for key, payload in legacy.items():  # FROM 'dt/meters/+/${ElectricityThing}/raw', ...
        thing = f"{PREFIX}-{key.removesuffix('Rule').lower()}"
        f = substitute(from_filter(payload), {key.replace("Rule", "Thing"): thing})
        assert mqtt_match(f, topic("meters", "15", thing, "raw")), key
        assert not mqtt_match(f, topic("meters", "15", THING, "raw")), key


def test_receipt_republishes_batch_and_topic_to_the_sending_gateway():
    template = load("analytics.yaml")
    payload = template["Resources"]["ReceiptRule"]["Properties"]["TopicRulePayload"]
    sql = sub_text(payload["Sql"])
    assert re.match(r"SELECT batch, topic\(\) AS topic FROM", sql)
    (action,) = payload["Actions"]
    republish = action["Republish"]
    assert republish["Topic"] == "cmd/meters/${topic(4)}/receipt"
    assert republish["Qos"] == 1
    # topic(4) of a data topic is its thing: the receipt goes back to the sender.
    assert topic("meters", "15", THING, "raw").split("/")[3] == THING


def test_basic_ingest_rule_name_is_the_same_in_both_stacks():
    analytics = load("analytics.yaml")
    name = sub_text(analytics["Resources"]["RawRule"]["Properties"]["RuleName"])
    assert name == "${RulePrefix}_raw"
    thing = load("thing.yaml")
    assert thing["Parameters"]["RulePrefix"]["Default"] == analytics["Parameters"]["RulePrefix"]["Default"]
    rule = substitute(name, {"RulePrefix": PREFIX})
    assert basic_ingest(topic("meters", "15", THING, "raw"), rule).startswith(f"$aws/rules/{rule}/")


# ------------------------------------------------------------------ analytics path


def test_firehose_partitions_are_the_tables_projection():
    template = load("analytics.yaml")
    s3 = template["Resources"]["DeliveryStream"]["Properties"]["ExtendedS3DestinationConfiguration"]
    assert s3["DynamicPartitioningConfiguration"]["Enabled"] is True
    params = {p["ParameterName"]: p["ParameterValue"]
              for proc in s3["ProcessingConfiguration"]["Processors"] if proc["Type"] == "MetadataExtraction"
              for p in proc["Parameters"]}
    assert params == {"MetadataExtractionQuery": "{kind: .kind}", "JsonParsingEngine": "JQ-1.6"}
    # the rules add the key the JQ query reads
    for key in ("RawRule", "ScoredRule"):
        assert "topic(5) AS kind" in template["Resources"][key]["Properties"]["TopicRulePayload"]["Sql"]
    table = template["Resources"]["ReadingsTable"]["Properties"]["TableInput"]
    location = sub_text(table["Parameters"]["storage.location.template"])
    prefix = s3["Prefix"].replace("!{partitionKeyFromQuery:kind}", "${!kind}").replace(
        "!{timestamp:yyyy-MM-dd}", "${!dt}")
    assert location == "s3://${DataBucket}/" + prefix
    assert [k["Name"] for k in table["PartitionKeys"]] == ["kind", "dt"]
    assert table["Parameters"]["projection.kind.values"] == "raw,scored"
    columns = {c["Name"] for c in table["StorageDescriptor"]["Columns"]}
    assert {"batch", "thing", "site", "n", "model", "readings"} <= columns


def test_bucket_is_encrypted_private_and_expires_data():
    bucket = load("analytics.yaml")["Resources"]["DataBucket"]["Properties"]
    assert bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"][0][
        "ServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    assert all(bucket["PublicAccessBlockConfiguration"].values())
    prefixes = {r.get("Prefix") for r in bucket["LifecycleConfiguration"]["Rules"]}
    assert {"readings/", "errors/", "athena-results/"} <= prefixes


@pytest.mark.parametrize("query", ["high_resolution", "daily_by_meter"])
def test_named_query_is_its_file_and_parses(query):
    template = load("analytics.yaml")
    named = {p["Name"]: p for p in resources(template, "AWS::Athena::NamedQuery").values()}
    text = (CLOUD / "athena" / f"{query}.sql").read_text()
    assert named[query]["QueryString"] == text
    tree = sqlglot.parse_one(text, read="athena")
    tables = {t.name for t in tree.find_all(sqlglot.exp.Table)} - {"flat", "ranked", "kept"}
    assert tables == {template["Resources"]["ReadingsTable"]["Properties"]["TableInput"]["Name"]}
    assert tree.find(sqlglot.exp.Unnest) is not None


def test_athena_files_are_all_embedded():
    template = load("analytics.yaml")
    names = {p["Name"] for p in resources(template, "AWS::Athena::NamedQuery").values()}
    assert names == {p.stem for p in (CLOUD / "athena").glob("*.sql")}


# ------------------------------------------------------------------ the legacy design


def test_legacy_design_one_thing_per_meter_type_through_filter_and_math():
    template = load(LEGACY)
    things = {sub_text(p["ThingName"]) for p in resources(template, "AWS::IoT::Thing").values()}
    assert things == {"${Prefix}-" + t for t in METER_TYPES}
    (pipeline,) = resources(template, "AWS::IoTAnalytics::Pipeline").values()
    activities = {next(iter(a.values()))["Name"]: (kind, body)
                  for a in pipeline["PipelineActivities"] for kind, body in a.items()}
    order, name = [], next(n for n, (k, _) in activities.items() if k == "Channel")
    while name:
        kind, body = activities[name]
        order.append(kind)
        name = body.get("Next")
    assert order == ["Channel", "Filter", "Math", "Datastore"]
    assert activities["drop_negative"][1]["Filter"] == "value >= 0"
    assert activities["to_kwh"][1] == {"Name": "to_kwh", "Attribute": "kwh", "Math": "value * unit_factor",
                                       "Next": "to_datastore"}
    for payload in (p["TopicRulePayload"] for p in resources(template, "AWS::IoT::TopicRule").values()):
        assert "AS unit_factor" in sub_text(payload["Sql"])
        assert payload["Actions"][0]["IotAnalytics"]["ChannelName"] == {"Ref": "Channel"}


def test_legacy_datasets_parse_and_read_the_datastore():
    template = load(LEGACY)
    datasets = resources(template, "AWS::IoTAnalytics::Dataset")
    assert len(datasets) == 2
    for props in datasets.values():
        (action,) = props["Actions"]
        sql = sub_text(action["QueryAction"]["SqlQuery"])
        tree = sqlglot.parse_one(substitute(sql, {"Datastore": "metergateway_datastore"}), read="presto")
        assert {t.name for t in tree.find_all(sqlglot.exp.Table)} - {"r"} == {"metergateway_datastore"}
        assert props["Triggers"][0]["Schedule"]["ScheduleExpression"].startswith("cron(")
