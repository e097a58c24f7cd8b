"""Fresh MLflow SQLite stores at no cost: copies of one empty store made per test session.

Creating a store runs all of MLflow's schema migrations (seconds on an idle machine, minutes on
a busy one); a copy of the file is the same store."""

from __future__ import annotations

import shutil
from pathlib import Path


def seed(template: Path, database: Path) -> Path:
    """A fresh store at ``database`` (its folder is created)."""
    database.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, database)
    return database
