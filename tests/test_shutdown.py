"""``core.shutdown.exit_fast``: a command that succeeded ends at once, yet loses nothing that
an ordinary exit would have written."""

from __future__ import annotations

import subprocess
import sys
import textwrap

PROGRAM = """
import atexit, sys, threading, time
from mnist_pipeline.core.shutdown import exit_fast

class Teardown:
    def __del__(self):
        print("teardown ran", flush=True)

keep = Teardown()  # freed only by Python's own teardown
atexit.register(lambda: print("exit handler ran", flush=True))
sys.stdout.write("buffered, no newline")
if sys.argv[1] == "thread":
    threading.Thread(target=lambda: (time.sleep(0.3), print("thread finished"))).start()
exit_fast(int(sys.argv[2]))
"""


def run(*args: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(PROGRAM)
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
    )


def test_exit_fast_skips_the_teardown_but_keeps_handlers_output_and_code() -> None:
    result = run("alone", "3")
    assert result.returncode == 3
    assert result.stdout.startswith("buffered, no newline"), result.stdout
    assert "exit handler ran" in result.stdout
    assert "teardown ran" not in result.stdout  # the point: no object-by-object teardown


def test_a_live_thread_gets_the_ordinary_exit() -> None:
    result = run("thread", "0")
    assert result.returncode == 0
    assert "thread finished" in result.stdout and "exit handler ran" in result.stdout
    assert "teardown ran" in result.stdout
