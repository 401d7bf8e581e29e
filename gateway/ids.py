"""The buffer's id registry: small integer ids for meters, sources and model versions.

A stored reading names its meter, its source and the model that scored it by id (``meters``,
``sources`` and ``models`` tables), not by name: a few bytes a row instead of three strings. The
three tables are small, so they are read whole into memory when the buffer opens, and a name seen
for the first time gets its id inside the transaction that first stores it.

Ids are only ever added. When that transaction rolls back, SQLite forgets the ids it handed out
(and will hand them out again), so the caches must forget them too: :meth:`Ids.mark` notes the
caches' sizes before a transaction and :meth:`Ids.restore` cuts them back to those sizes (the
buffer's ``_atomic`` does both).
"""

from __future__ import annotations

import sqlite3
from typing import NamedTuple


class MeterInfo(NamedTuple):
    site: str
    building: str
    meter: str

    @property
    def key(self) -> str:
        return f"{self.building}:{self.meter}"


class Ids:
    """The meter, source and model ids of one buffer file, cached in memory."""

    def __init__(self, db: sqlite3.Connection):
        self.meters: dict[int, MeterInfo] = {}
        self.meter_ids: dict[tuple[str, str, str], int] = {}
        for mid, site, building, meter in db.execute("SELECT id, site, building, meter FROM meters"):
            self.meters[mid] = MeterInfo(site, building, meter)
            self.meter_ids[(site, building, meter)] = mid
        self.source_ids: dict[str, int] = {name: sid for sid, name in db.execute("SELECT id, name FROM sources")}
        try:
            self.models: dict[int, str] = dict(db.execute("SELECT id, version FROM models"))
        except sqlite3.OperationalError:  # a read-only look at a file not yet migrated
            self.models = {}
        self.model_ids = {v: k for k, v in self.models.items()}

    def meter_id(self, db: sqlite3.Connection, site: str, building: str, meter: str) -> int:
        """The id of a meter, recorded on first sight (inside the caller's transaction)."""
        mid = self.meter_ids.get((site, building, meter))
        if mid is None:
            mid = db.execute(
                "INSERT INTO meters(site, building, meter) VALUES(?, ?, ?)", (site, building, meter)
            ).lastrowid
            self.meters[mid] = MeterInfo(site, building, meter)
            self.meter_ids[(site, building, meter)] = mid
        return mid

    def source_id(self, db: sqlite3.Connection, name: str) -> int:
        """The id of source ``name``, recorded on first sight (inside the caller's transaction)."""
        sid = self.source_ids.get(name)
        if sid is None:
            sid = self.source_ids[str(name)] = db.execute(
                "INSERT INTO sources(name) VALUES(?)", (str(name),)).lastrowid
        return sid

    def source_name(self, sid: int) -> str:
        for name, i in self.source_ids.items():
            if i == sid:
                return name
        return str(sid)

    def model_id(self, db: sqlite3.Connection, version: str) -> int:
        """The id of model ``version``, recorded on first sight (inside the caller's transaction)."""
        mid = self.model_ids.get(version)
        if mid is None:
            mid = db.execute("INSERT INTO models(version) VALUES(?)", (version,)).lastrowid
            self.models[mid] = version
            self.model_ids[version] = mid
        return mid

    def mark(self) -> tuple[int, int, int]:
        """The caches' sizes, for :meth:`restore` after a rollback."""
        return len(self.meters), len(self.source_ids), len(self.models)

    def restore(self, mark: tuple[int, int, int]) -> None:
        """Forget the ids handed out since ``mark`` (their transaction rolled back)."""
        n_meters, n_sources, n_models = mark
        while len(self.meters) > n_meters:
            mid, info = self.meters.popitem()
            self.meter_ids.pop(tuple(info), None)
        while len(self.source_ids) > n_sources:
            self.source_ids.pop(next(reversed(self.source_ids)))
        while len(self.models) > n_models:
            self.model_ids.pop(self.models.popitem()[1], None)
