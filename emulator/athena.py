"""Amazon Athena over the local S3, emulated with DuckDB from the template's Glue table.

``cloud/analytics.yaml`` declares the whole read side, and this module takes all of it from
there:

- the **Glue table** (``AWS::Glue::Table``): its columns and their Hive types become the
  ``columns=`` of DuckDB's ``read_json`` (``array<array<string>>`` -> ``VARCHAR[][]``; a JSON number
  read into a string column keeps its text, as the OpenX JSON SerDe does), over the objects under
  ``storage.location.template`` with ``${kind}``/``${dt}`` as globs;
- **partition projection**: the partition columns come from the object paths (the template's
  ``kind=${kind}/dt=${dt}/`` is Hive style), and only the partitions the projection allows are
  read (an ``enum``'s values; a ``date`` range such as ``2024-01-01,NOW``);
- the **database** is a DuckDB schema of the same name (and the default one), so both
  ``readings`` and ``metergateway.readings`` work;
- the **named queries** (``AWS::Athena::NamedQuery``): their Trino SQL is transpiled to DuckDB
  by sqlglot (``element_at`` -> list index, ``CROSS JOIN UNNEST ... AS t (r)``, ``from_unixtime``,
  ``date()``, ``count_if``...); the session time zone is UTC, as Athena's;
- each object is parsed once (S3 objects are immutable): new objects are read into a cache
  table at the next query, removed ones dropped, so the dashboard's repeated queries pay only
  for the query itself;
- the **workgroup**'s ``ResultConfiguration.OutputLocation``: each query's result is written
  there as ``<QueryExecutionId>.csv``, as Athena does: a header row, every value in double
  quotes, NULL as an empty unquoted field.

::

    athena = LocalAthena(root)                 # cloud/analytics.yaml, bucket metergateway-data
    athena.named_queries()                     # {'high_resolution': 'WITH flat AS ...', ...}
    result = athena.run_named("daily_by_meter")
    result.columns, result.rows, result.output_key   # 'athena-results/<id>.csv'
    athena.query("SELECT kind, count(*) FROM readings GROUP BY kind")
"""

from __future__ import annotations

import datetime as _dt
import decimal
import glob
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from emulator.cfn import load_template, resolve
from emulator.firehose import DEFAULT_TEMPLATE, java_datetime
from emulator.s3 import LocalBucket

__all__ = ["AthenaError", "LocalAthena", "Result", "TableSpec", "hive_to_duckdb"]


class AthenaError(ValueError):
    """A query or template the local Athena cannot run, with what went wrong and where."""


@dataclass
class Result:
    """A query's result: column names, rows of Python values, and where its CSV was written."""

    columns: list[str]
    rows: list[tuple]
    query_execution_id: str
    output_key: str
    output_path: Path
    sql: str = field(repr=False, default="")

    def dicts(self) -> list[dict]:
        return [dict(zip(self.columns, row)) for row in self.rows]


# ------------------------------------------------------------------ Hive types

_SIMPLE = {
    "string": "VARCHAR", "varchar": "VARCHAR", "char": "VARCHAR", "tinyint": "TINYINT",
    "smallint": "SMALLINT", "int": "INTEGER", "integer": "INTEGER", "bigint": "BIGINT",
    "float": "FLOAT", "double": "DOUBLE", "boolean": "BOOLEAN", "date": "DATE",
    "timestamp": "TIMESTAMP", "binary": "BLOB",
}


def hive_to_duckdb(hive: str) -> str:
    """The DuckDB type of a Glue/Hive column type (array<>, map<>, struct<>, decimal(p,s) too)."""
    text = hive.replace(" ", "")
    pos = 0

    def parse() -> str:
        nonlocal pos
        m = re.match(r"[a-zA-Z_][a-zA-Z0-9_]*", text[pos:])
        if not m:
            raise AthenaError(f"column type {hive!r}: cannot read at {text[pos:]!r}")
        name = m.group(0).lower()
        pos += len(m.group(0))
        if name == "array":
            expect("<")
            inner = parse()
            expect(">")
            return f"{inner}[]"
        if name == "map":
            expect("<")
            k = parse()
            expect(",")
            v = parse()
            expect(">")
            return f"MAP({k}, {v})"
        if name == "struct":
            expect("<")
            fields = []
            while True:
                fm = re.match(r"[^:<>,]+", text[pos:])
                if not fm:
                    raise AthenaError(f"column type {hive!r}: a struct field needs a name")
                pos += len(fm.group(0))
                expect(":")
                fields.append(f'"{fm.group(0)}" {parse()}')
                if text[pos:pos + 1] == ",":
                    pos += 1
                    continue
                expect(">")
                return f"STRUCT({', '.join(fields)})"
        if name == "decimal":
            dm = re.match(r"\((\d+),(\d+)\)", text[pos:])
            if dm:
                pos += len(dm.group(0))
                return f"DECIMAL({dm.group(1)}, {dm.group(2)})"
            return "DECIMAL(10, 0)"
        if name in ("varchar", "char"):
            cm = re.match(r"\(\d+\)", text[pos:])
            if cm:
                pos += len(cm.group(0))
        if name not in _SIMPLE:
            raise AthenaError(f"column type {hive!r}: {name} is not a Glue type")
        return _SIMPLE[name]

    def expect(ch: str) -> None:
        nonlocal pos
        if text[pos:pos + 1] != ch:
            raise AthenaError(f"column type {hive!r}: expected {ch!r} at {text[pos:]!r}")
        pos += 1

    out = parse()
    if pos != len(text):
        raise AthenaError(f"column type {hive!r}: unexpected {text[pos:]!r}")
    return out


def _java_strftime(pattern: str) -> str:
    """A strptime format for a Java date pattern of letters yyyy MM dd HH mm ss and literals."""
    table = {"yyyy": "%Y", "MM": "%m", "dd": "%d", "HH": "%H", "mm": "%M", "ss": "%S"}
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c.isalpha():
            j = i
            while j < len(pattern) and pattern[j] == c:
                j += 1
            if pattern[i:j] not in table:
                raise AthenaError(f"projection date format {pattern!r}: {pattern[i:j]!r} is not supported locally")
            out += table[pattern[i:j]]
            i = j
        elif c == "'":
            j = pattern.index("'", i + 1)
            out += pattern[i + 1:j].replace("%", "%%")
            i = j + 1
        else:
            out += "%%" if c == "%" else c
            i += 1
    return out


# ------------------------------------------------------------------ the table


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass
class TableSpec:
    """A Glue table resolved from the template: what DuckDB needs to read it."""

    database: str
    name: str
    columns: list[tuple[str, str]]      # (name, DuckDB type)
    partitions: list[tuple[str, str]]
    location_template: str              # s3://bucket/readings/kind=${kind}/dt=${dt}/
    projection: dict[str, dict]         # partition name -> {"type", "values" | "format", "range"}
    serde: str

    @classmethod
    def from_resource(cls, logical: str, props: dict) -> "TableSpec":
        where = f"Resources.{logical}.Properties.TableInput"
        table = props["TableInput"]
        sd = table.get("StorageDescriptor", {})
        serde = sd.get("SerdeInfo", {}).get("SerializationLibrary", "")
        if "JsonSerDe" not in serde:
            raise AthenaError(f"{where}.StorageDescriptor.SerdeInfo: {serde!r}; only a JSON SerDe is emulated")
        params = table.get("Parameters", {})
        partitions = [(k["Name"], hive_to_duckdb(k["Type"])) for k in table.get("PartitionKeys", [])]
        location = params.get("storage.location.template") or sd["Location"].rstrip("/") + "/" + "/".join(
            f"{n}=${{{n}}}" for n, _ in partitions) + "/"
        projection = {}
        if str(params.get("projection.enabled", "false")).lower() == "true":
            for name, _ in partitions:
                kind = params.get(f"projection.{name}.type")
                spec = {"type": kind}
                if kind == "enum":
                    spec["values"] = [v.strip() for v in params[f"projection.{name}.values"].split(",")]
                elif kind == "date":
                    spec["format"] = params[f"projection.{name}.format"]
                    spec["range"] = [v.strip() for v in params[f"projection.{name}.range"].split(",")]
                elif kind == "injected":
                    pass
                else:
                    raise AthenaError(f"{where}.Parameters.projection.{name}.type: {kind!r} is not emulated "
                                      "(enum, date, injected)")
                projection[name] = spec
        for name, _ in partitions:
            if f"{name}=${{{name}}}" not in location:
                raise AthenaError(f"{where}: the location template {location!r} does not hold "
                                  f"{name}=${{{name}}}; only Hive-style partition paths are emulated")
        return cls(
            database=table.get("DatabaseName") or props.get("DatabaseName"),
            name=table["Name"],
            columns=[(c["Name"], hive_to_duckdb(c["Type"])) for c in sd.get("Columns", [])],
            partitions=partitions,
            location_template=location,
            projection=projection,
            serde=serde,
        )

    def objects_glob(self, bucket: LocalBucket) -> str:
        """The glob of the table's object files (each partition folder's files)."""
        folder = bucket.uri_to_path(re.sub(r"\$\{[^}]+\}", "*", self.location_template))
        return str(folder / "*")

    def read_sql(self, files: list[str]) -> str:
        """A DuckDB SELECT of the columns, the partition columns and "$path" of ``files``."""
        columns = ", ".join(f"{_sql_str(n)}: {_sql_str(t)}" for n, t in self.columns)
        hive_types = ", ".join(f"{_sql_str(n)}: {_sql_str(t)}" for n, t in self.partitions)
        select = ", ".join(_ident(n) for n, _ in self.columns + self.partitions)
        listed = "[" + ", ".join(_sql_str(f) for f in files) + "]"
        return (f"SELECT {select}, filename AS \"$path\" FROM read_json({listed}, format='newline_delimited', "
                f"columns={{{columns}}}, hive_partitioning=true, hive_types={{{hive_types}}}, "
                "ignore_errors=false, maximum_object_size=134217728, filename=true)")

    def empty_sql(self) -> str:
        cols = ", ".join(f"CAST(NULL AS {t}) AS {_ident(n)}" for n, t in self.columns + self.partitions)
        return f"SELECT {cols}, CAST(NULL AS VARCHAR) AS \"$path\" WHERE false"

    def projection_sql(self, today: _dt.date) -> str:
        """The WHERE condition that keeps only the partitions the projection allows ("" if none)."""
        conditions = []
        for name, spec in self.projection.items():
            if spec["type"] == "enum":
                conditions.append(f"{_ident(name)} IN ({', '.join(_sql_str(v) for v in spec['values'])})")
            elif spec["type"] == "date":
                fmt = _java_strftime(spec["format"])
                low, high = (self._range_end(v, spec["format"], today) for v in spec["range"])
                conditions.append(f"try_strptime({_ident(name)}, {_sql_str(fmt)}) BETWEEN "
                                  f"strptime({_sql_str(low)}, {_sql_str(fmt)}) AND "
                                  f"strptime({_sql_str(high)}, {_sql_str(fmt)})")
        return " AND ".join(conditions)

    @staticmethod
    def _range_end(value: str, fmt: str, today: _dt.date) -> str:
        m = re.fullmatch(r"NOW(?:([+-])(\d+)(DAYS?|WEEKS?|MONTHS?|YEARS?))?", value.upper())
        if not m:
            return value
        day = today
        if m.group(1):
            n = int(m.group(2)) * (1 if m.group(1) == "+" else -1)
            unit = m.group(3).rstrip("S")
            day = today + _dt.timedelta(days=n * {"DAY": 1, "WEEK": 7, "MONTH": 30, "YEAR": 365}[unit])
        moment = _dt.datetime(day.year, day.month, day.day, 23, 59, 59, tzinfo=_dt.timezone.utc)
        return java_datetime(fmt)(moment)


# ------------------------------------------------------------------ CSV as Athena writes it


def _java_double(x: float) -> str:
    """A double as Java's Double.toString prints it (what Athena's CSV holds)."""
    if x != x:
        return "NaN"
    if x in (float("inf"), float("-inf")):
        return "Infinity" if x > 0 else "-Infinity"
    if x == 0 or 1e-3 <= abs(x) < 1e7:
        return repr(float(x))
    sign, digits, exponent = decimal.Decimal(repr(float(x))).as_tuple()
    text = "".join(map(str, digits)).rstrip("0") or "0"
    power = len(digits) - 1 + exponent
    return f"{'-' if sign else ''}{text[0]}.{text[1:] or '0'}E{power}"


def _csv_value(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return _java_double(v)
    if isinstance(v, _dt.datetime):
        text = v.strftime("%Y-%m-%d %H:%M:%S.") + f"{v.microsecond // 1000:03d}"
        if v.tzinfo is not None:
            text += " UTC" if v.utcoffset() == _dt.timedelta(0) else v.strftime(" %z")
        return text
    if isinstance(v, (_dt.date, decimal.Decimal, int)):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join("null" if x is None else (_csv_value(x) or "") for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={_csv_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def athena_csv(columns: list[str], rows: list[tuple]) -> bytes:
    """Athena's result CSV: header, every field double-quoted, NULL empty and unquoted."""
    def field_(v) -> str:
        text = _csv_value(v)
        return "" if text is None else '"' + text.replace('"', '""') + '"'

    lines = [",".join('"' + c.replace('"', '""') + '"' for c in columns)]
    lines.extend(",".join(field_(v) for v in row) for row in rows)
    return ("\n".join(lines) + "\n").encode()


# ------------------------------------------------------------------ the service


class LocalAthena:
    """The template's Glue tables, workgroup and named queries over ``<root>/s3/<bucket>/``."""

    def __init__(self, root: str | os.PathLike, template_path: str | os.PathLike = DEFAULT_TEMPLATE,
                 bucket: str = "metergateway-data", params: dict | None = None,
                 clock: Callable[[], float] = time.time, threads: int | None = None):
        import duckdb  # the emulator extra; imported here so that loading this module costs nothing
        import sqlglot

        self._duckdb, self._sqlglot = duckdb, sqlglot
        self.root = Path(root)
        self.clock = clock
        template = load_template(template_path)
        res = template.get("Resources", {})
        names = dict(params or {})
        names.update({k: bucket for k, r in res.items() if r["Type"] == "AWS::S3::Bucket"})
        # !Ref of an AWS::Glue::Database is its DatabaseInput.Name.
        for k, r in res.items():
            if r["Type"] == "AWS::Glue::Database" and k not in names:
                names[k] = resolve(r["Properties"]["DatabaseInput"]["Name"], names, template=template)

        def props(logical):
            return resolve(res[logical].get("Properties", {}), names, template=template)

        self.bucket = LocalBucket(self.root, bucket)
        self.tables = [TableSpec.from_resource(k, props(k)) for k, r in res.items() if r["Type"] == "AWS::Glue::Table"]
        if not self.tables:
            raise AthenaError(f"{template_path}: no AWS::Glue::Table resource")
        self.workgroups: dict[str, str] = {}
        for k, r in res.items():
            if r["Type"] == "AWS::Athena::WorkGroup":
                p = props(k)
                location = p.get("WorkGroupConfiguration", {}).get("ResultConfiguration", {}).get("OutputLocation")
                if not location:
                    raise AthenaError(f"Resources.{k}: no WorkGroupConfiguration.ResultConfiguration.OutputLocation")
                self.workgroups[p["Name"]] = location
        if not self.workgroups:
            raise AthenaError(f"{template_path}: no AWS::Athena::WorkGroup resource")
        self._named: dict[str, dict] = {}
        for k, r in res.items():
            if r["Type"] == "AWS::Athena::NamedQuery":
                p = props(k)
                self._named[p["Name"]] = p
        self.database = self.tables[0].database
        self.workgroup = next(iter(self.workgroups))
        self._con = duckdb.connect(":memory:", config={"threads": threads} if threads else {})
        self._con.execute("SET TimeZone = 'UTC'")
        # ORDER BY is still honoured; without it the window of the dedup runs in parallel.
        self._con.execute("SET preserve_insertion_order = false")
        self._loaded: dict[str, set[str]] = {}
        for db in {t.database for t in self.tables}:
            self._con.execute(f"CREATE SCHEMA IF NOT EXISTS {_ident(db)}")
        self._con.execute(f"SET search_path = {_sql_str(self.database)}")
        self._lock = threading.Lock()

    # -- queries

    def named_queries(self) -> dict[str, str]:
        """Every named query's Trino SQL, by name."""
        return {name: p["QueryString"] for name, p in self._named.items()}

    def run_named(self, name: str) -> Result:
        """Run a named query in its database and workgroup."""
        if name not in self._named:
            raise AthenaError(f"named query {name!r} not found (the template has {sorted(self._named)})")
        p = self._named[name]
        return self.query(p["QueryString"], workgroup=p.get("WorkGroup"), database=p.get("Database"))

    def transpile(self, sql: str) -> str:
        """The DuckDB text of one Trino (Athena engine v3) statement."""
        try:
            statements = self._sqlglot.parse(sql, read="athena")
        except self._sqlglot.errors.ParseError as exc:
            raise AthenaError(f"SYNTAX_ERROR: {exc}") from exc
        statements = [s for s in statements if s is not None]
        if len(statements) != 1:
            raise AthenaError(f"a query is one statement; got {len(statements)}")
        return statements[0].transform(self._trino_semantics).sql(dialect="duckdb")

    def _trino_semantics(self, node):
        """Where DuckDB's function of the same name answers differently from Trino's."""
        exp = self._sqlglot.exp
        if isinstance(node, exp.CountIf):
            # Trino's count_if counts the true values: 0 over no true value; DuckDB's gives NULL
            # when every value is NULL (a raw reading's flag).
            return exp.Count(this=exp.If(this=node.this.copy(), true=exp.Literal.number(1)))
        return node

    def query(self, sql: str, workgroup: str | None = None, database: str | None = None) -> Result:
        """Run Trino SQL over the tables; the result CSV goes to the workgroup's output location.

        ``database`` is the default for unqualified table names (the template's database).
        """
        workgroup = workgroup or self.workgroup
        database = database or self.database
        if database not in {t.database for t in self.tables}:
            raise AthenaError(f"database {database!r} not found (the template has "
                              f"{sorted({t.database for t in self.tables})})")
        if workgroup not in self.workgroups:
            raise AthenaError(f"workgroup {workgroup!r} not found (the template has {sorted(self.workgroups)})")
        duck = self.transpile(sql)
        qid = str(uuid.uuid4())
        with self._lock:
            try:
                self._refresh_views()
                self._con.execute(f"SET search_path = {_sql_str(database)}")
                # One connection, under the lock: a cursor would not carry the session's
                # TimeZone and search_path.
                rel = self._con.execute(duck)
                columns = [d[0] for d in rel.description]
                rows = rel.fetchall()
            except self._duckdb.Error as exc:
                raise AthenaError(f"query {qid} failed: {exc}\n-- as run by DuckDB:\n{duck}") from exc
        location = self.workgroups[workgroup].rstrip("/") + f"/{qid}.csv"
        key = location[len(f"s3://{self.bucket.name}/"):]
        if not location.startswith(f"s3://{self.bucket.name}/"):
            raise AthenaError(f"workgroup {workgroup}: output location {location} is not in the local bucket")
        path = self.bucket.put(key, athena_csv(columns, rows))
        return Result(columns=columns, rows=rows, query_execution_id=qid, output_key=key,
                      output_path=path, sql=duck)

    def _refresh_views(self) -> None:
        # S3 objects are immutable: each object file is parsed once into a cache table (with
        # Athena's "$path"), new files are added and vanished ones dropped at each query, and the
        # table is a view over the cache that applies the partition projection.
        today = _dt.datetime.fromtimestamp(self.clock(), tz=_dt.timezone.utc).date()
        for t in self.tables:
            cache = _ident(f"_objects_{t.database}_{t.name}")
            loaded = self._loaded.get(cache)
            if loaded is None:
                self._con.execute(f"CREATE TABLE main.{cache} AS {t.empty_sql()}")
                loaded = self._loaded[cache] = set()
            files = set(glob.glob(t.objects_glob(self.bucket)))
            gone, new = loaded - files, sorted(files - loaded)
            if gone:
                listed = ", ".join(_sql_str(f) for f in gone)
                self._con.execute(f'DELETE FROM main.{cache} WHERE "$path" IN ({listed})')
                loaded -= gone
            for i in range(0, len(new), 1000):
                part = new[i:i + 1000]
                self._con.execute(f"INSERT INTO main.{cache} {t.read_sql(part)}")
                loaded.update(part)
            where = t.projection_sql(today)
            columns = ", ".join(_ident(n) for n, _ in t.columns + t.partitions)
            self._con.execute(f"CREATE OR REPLACE VIEW {_ident(t.database)}.{_ident(t.name)} AS "
                              f"SELECT {columns} FROM main.{cache}{' WHERE ' + where if where else ''}")

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "LocalAthena":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
