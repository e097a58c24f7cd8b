"""What importing the package sets for the whole process: the garbage collector's threshold
(``mnist_pipeline.GC_THRESHOLD``), raised so that importing TensorFlow and MLflow does not
spend a fifth of its time in collections, and never lowered."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import gc, json, sys
{before}
import mnist_pipeline
print(json.dumps({{"threshold": gc.get_threshold(), "enabled": gc.isenabled(),
                  "ours": mnist_pipeline.GC_THRESHOLD}}))
"""


def probe(before: str = "") -> dict:
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(before=before)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)


def test_importing_the_package_raises_the_first_threshold_only() -> None:
    default = subprocess.run(
        [sys.executable, "-c", "import gc; print(list(gc.get_threshold()))"],
        capture_output=True,
        text=True,
        check=True,
    )
    defaults = json.loads(default.stdout)
    seen = probe()
    assert seen["threshold"] == [seen["ours"], *defaults[1:]]
    assert seen["ours"] > defaults[0] and seen["enabled"]


@pytest.mark.parametrize(
    ("before", "threshold", "enabled"),
    [
        ("gc.set_threshold(200000, 5, 5)", [200000, 5, 5], True),  # a higher one set first
        ("gc.disable()", None, False),  # a collector turned off stays off
    ],
)
def test_what_the_process_set_before_is_kept(before: str, threshold, enabled: bool) -> None:
    seen = probe(before)
    assert seen["enabled"] is enabled
    if threshold is not None:
        assert seen["threshold"] == threshold
