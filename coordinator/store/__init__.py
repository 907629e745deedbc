"""The SQLite record (sqlite-utils): schema and migrations, writes, queries, rebuild.

The spool is the truth about tasks; this package records what happened so status, history and
dashboards can be answered fast, and can rebuild that record from the spool at any time. It is
the one home of sqlite-utils. It reads the spool (for :func:`rebuild`); the spool never imports it.
"""

from coordinator.store.db import Store
from coordinator.store.rebuild import rebuild
from coordinator.store.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "Store", "rebuild"]
