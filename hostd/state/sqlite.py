"""A SQLite database with a versioned schema: what hostd's Store and the
master's MasterStore have in common.

The schema version is SQLite's user_version. Opening a database runs the
migrations it lacks, in order, each in one transaction; a database newer than
this code is refused rather than misread. Autocommit (isolation_level=None)
with WAL; several statements that must land together use transaction().
"""
from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sfmpi.errors import HostdError


class VersionedDb:
    # Each entry takes the schema from version i to i + 1; what names the database in errors.
    MIGRATIONS: tuple[str, ...] = ()
    WHAT = "database"

    def __init__(self, path: Path | str, foreign_keys: bool = False):
        self.db = sqlite3.connect(str(path), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        if foreign_keys:
            self.db.execute("PRAGMA foreign_keys=ON")  # per connection
        self._migrate()

    def _found_version(self) -> int:
        """The version of the database as found (a subclass may recognise one from before versions)."""
        return self.version

    def _migrate(self) -> None:
        version, latest = self._found_version(), len(self.MIGRATIONS)
        if version > latest:
            raise HostdError(f"{self.WHAT} {self.path} has schema version {version}; this sfmpi "
                             f"knows up to {latest} (a newer sfmpi wrote it)")
        for target in range(version + 1, latest + 1):
            with self._transaction():
                for statement in filter(str.strip, self.MIGRATIONS[target - 1].split(";")):
                    self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {target}")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """Several statements that must land together; IMMEDIATE so a second
        writer waits instead of failing half-way."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    @property
    def path(self) -> str:
        return self.db.execute("PRAGMA database_list").fetchone()[2]

    @property
    def version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def close(self) -> None:
        self.db.close()
