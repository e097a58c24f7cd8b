"""What every Python process of a test run loads at start-up: the network audit
(``netaudit``) and coverage without its cost outside ``src/`` (``lean_coverage``).

Python imports ``sitecustomize`` from the first folder on its path that has one: the suite
puts this folder on ``PYTHONPATH`` (``tests/conftest.py``), and ``tools.workspace`` copies
these three files into the ``src/`` of every project copy it makes during a test run (their
DVC stage commands set ``PYTHONPATH=src``). Standard library only, besides coverage itself."""

import lean_coverage
import netaudit  # noqa: F401 (its import installs the audit hook)

lean_coverage.install()
