"""Keep the stages' logs readable: drop TensorFlow's native start-up noise, nothing else.

TensorFlow's C++ code writes straight to file descriptor 2, so Python logging cannot filter
it, and ``TF_CPP_MIN_LOG_LEVEL=3`` would hide real TensorFlow errors too. Instead stderr is
passed through a filter that drops only lines known to be harmless: on a machine with no
NVIDIA driver, the CUDA probe's ``failed call to cuInit`` and ``Could not find cuda
drivers`` (with a GPU present they are real problems and stay), the ``NodeDef mentions
attribute`` version-skew notice, oneDNN's "custom operations are on" notice, and absl's
pre-initialisation banner. Every other line,
a TensorFlow error included, goes through unchanged. ``MNIST_PIPELINE_RAW_LOGS=1`` turns the
filter off.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from mnist_pipeline.core.errors import DEBUG_ENV

#: Always noise: a notice that the graph came from a newer op registry, absl's banner, and
#: the notice that oneDNN's CPU kernels are on (an INFO line on every CPU run).
ALWAYS = (
    rb"node_def_util\.cc:\d+\] NodeDef mentions attribute \w+ which is not in the op definition",
    rb"\] oneDNN custom operations are on\. ",
    rb"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
)
#: Noise only where there is no NVIDIA driver at all (nothing for CUDA to find).
NO_GPU = (
    rb"failed call to cuInit",
    rb"cudart_stub\.cc:\d+\] Could not find cuda drivers",
)

_state: dict[str, int] = {}
#: What ``restore`` writes last into the pipe: the pump stops there.
_END = b"\x00mnist-pipeline: end of the stderr filter\x00\n"


def has_nvidia_driver() -> bool:
    return Path("/proc/driver/nvidia").exists() or Path("/dev/nvidiactl").exists()


def noise_patterns(gpu: bool) -> re.Pattern[bytes]:
    return re.compile(b"|".join(ALWAYS if gpu else ALWAYS + NO_GPU))


def stderr_fd() -> int:
    """The real stderr: for a signal handler that exits at once (the filter thread may not
    get to run again)."""
    return _state.get("stderr", 2)


def filter_native_stderr() -> None:
    """Route fd 2 through the noise filter for the rest of this process (idempotent)."""
    if "stderr" in _state or os.environ.get("MNIST_PIPELINE_RAW_LOGS"):
        return
    noise = noise_patterns(has_nvidia_driver())
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    _state["stderr"] = real

    def pump() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as source:
            for line in iter_lines(source):
                ended = line.endswith(_END)
                line = line.removesuffix(_END)
                if line and not noise.search(line):
                    os.write(real, line)
                if ended:
                    return

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()

    def restore() -> None:
        sys.stderr.flush()
        # The pump stops at the marker, not at EOF: a library that keeps a copy of fd 2
        # (vl-convert's JavaScript runtime does) holds the pipe open until the process is
        # gone, and waiting for EOF cost every such process the join's 5 s timeout.
        os.write(2, _END)
        os.dup2(real, 2)
        thread.join(timeout=5)

    atexit.register(restore)


def iter_lines(source: BinaryIO) -> Iterator[bytes]:
    """Lines as they arrive (a partial last line too), without waiting for a full buffer."""
    pending = b""
    while chunk := source.read(65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line + b"\n"
    if pending:
        yield pending


def quiet_progress() -> bool:
    """Outside a terminal, no Keras progress bars (returns whether one is allowed).

    A bar redrawn with ``\\r`` is one very long line in a log file, and calls Keras makes
    on our behalf (MLflow predicting on the input example while logging the model) show
    one; Keras then sends those messages to absl logging at INFO, which is dropped here.
    Call it after ``keras.backend.clear_session()``, which resets Keras's global state. The
    train stage logs one line per epoch itself."""
    import logging

    if sys.stdout.isatty():
        return True
    import keras  # seconds to import: only in the stages that already use Keras

    keras.config.disable_interactive_logging()
    logging.getLogger("absl").setLevel(logging.WARNING)
    return False


def quiet_command(level: int | None = None) -> None:
    """The user-facing commands (``register``, ``predict``, ``compare``, ``serve``,
    ``reproduce``) print what they did, not the libraries' start-up: TensorFlow's native noise
    is filtered as in the stages, MLflow's INFO chatter and progress bars are off (warnings and
    errors still show), in this process and the ones it starts (``serve``'s server inherits the
    filtered stderr). ``MNIST_PIPELINE_DEBUG=1`` shows everything. ``level``: also configure
    the root logger (``register``, ``predict``: warnings as ``WARNING name: message``)."""
    if level is not None:
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if os.environ.get(DEBUG_ENV):
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # if it was imported already
    filter_native_stderr()
