"""The small doors of the DVC workflow, without running the pipeline: config refused at
composition, the check stage, the dirty check, log filtering, help texts."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnist_pipeline.core.project import CONF_DIR, PROJECT_ROOT
from mnist_pipeline.stages.download import Mirror
from tests.helpers.cli import run_module
from tests.helpers.config import edit_yaml
from tools.workspace import git_commit


@pytest.mark.parametrize(
    "override",
    ["model.units=0", "seed=-1", "seed=4294967296", "train.epochs=abc", "data.val_split=1.5"],
)
def test_dvc_composition_refuses_bad_values(tmp_path, override):
    """DVC's own composition (what `dvc exp run -S` calls, before it writes params.yaml or
    removes anything) refuses values out of range, not just wrong types."""
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    plugins = str(PROJECT_ROOT / "src")
    with pytest.raises(Exception, match=override.split("=")[0].replace(".", r"\.")):
        compose_and_dump(out, CONF_DIR, None, "config", plugins, [override])
    assert not out.exists()


def test_check_stage(tmp_path, monkeypatch):
    shutil.copytree(PROJECT_ROOT / "conf", tmp_path / "conf")
    shutil.copy(PROJECT_ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    run = [sys.executable, "-m", "mnist_pipeline.check"]
    ok = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "data/params.ok").exists()

    # Whatever seed the working copy holds (an experiment may have set another).
    edit_yaml(tmp_path / "params.yaml", seed=-1)
    bad = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: params.yaml: seed must be between 0 and 2**32 - 1")
    assert "Traceback" not in bad.stderr


def test_committed_params_yaml_is_composed_conf(tmp_path):
    """The committed params.yaml (git's copy: an experiment may have rewritten the working
    one) is what conf/ composes to. Fix a failure with `make params` and commit."""
    from dvc.utils.hydra import compose_and_dump

    from mnist_pipeline.core.params import compose_params

    committed = subprocess.run(
        ["git", "show", "HEAD:params.yaml"], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    text = (
        committed.stdout
        if committed.returncode == 0
        else (PROJECT_ROOT / "params.yaml").read_text()
    )
    import yaml

    dvc_output = tmp_path / "params.yaml"
    compose_and_dump(dvc_output, CONF_DIR, None, "config", str(tmp_path), [])
    assert yaml.safe_load(dvc_output.read_text()) == yaml.safe_load(text)
    assert compose_params() == text


def test_dirty_check_ignores_what_dvc_manages(tmp_path, monkeypatch):
    from mnist_pipeline.tracking import provenance
    from mnist_pipeline.tracking.dvcfiles import managed_paths

    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(PROJECT_ROOT / name, tmp_path / name)
    (tmp_path / "reports").mkdir()
    for name in ("metrics.json", "data.json", "train_history.csv"):
        (tmp_path / "reports" / name).write_text("{}\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    git_commit(tmp_path)
    monkeypatch.chdir(tmp_path / "reports")  # anywhere in the repository

    assert "reports/test_predictions.csv" in managed_paths(tmp_path)  # from dvc.yaml's ${paths}
    for name in ("metrics.json", "data.json", "train_history.csv"):
        (tmp_path / "reports" / name).unlink()  # what DVC does before a stage runs
    (tmp_path / "dvc.lock").write_text("changed\n")
    params = (tmp_path / "params.yaml").read_text()
    edit_yaml(tmp_path / "params.yaml", seed=7)  # whatever seed the working copy had
    assert (tmp_path / "params.yaml").read_text() != params
    assert provenance.uncommitted_changes() == ""
    assert provenance.provenance_tags()["git.dirty"] == "false"
    (tmp_path / "code.py").write_text("x = 2\n")
    assert provenance.provenance_tags()["git.dirty"] == "true"


def test_training_refuses_arrays_changed_after_preprocess(prepared):
    """An array replaced by hand after preprocess (or a damaged copy from .dvc/cache) is
    refused before anything is trained on it: its run would record data dvc.lock does not."""
    from mnist_pipeline.core.errors import DataError
    from mnist_pipeline.stages import train

    processed = Path(prepared.paths.processed)
    labels = np.load(processed / "y_train.npy")
    np.save(processed / "y_train.npy", (labels + 1) % 10)  # replaced by hand after preprocess
    with pytest.raises(DataError, match="is not what the preprocess stage wrote") as refused:
        train.train(prepared)
    assert "dvc checkout --force data/processed" in str(refused.value)
    assert not (Path(prepared.paths.models) / "model.keras").exists()


def filtered(script: str) -> subprocess.CompletedProcess:
    """``script`` run by a fresh Python with the project's stderr filter on, as a stage has it."""
    setup = (
        "import os\nfrom mnist_pipeline.core import log_filter\nlog_filter.filter_native_stderr()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MNIST_PIPELINE_RAW_LOGS"}
    return subprocess.run(
        [sys.executable, "-c", setup + script], capture_output=True, text=True, timeout=60, env=env
    )


def test_noise_filter_keeps_real_errors(tmp_path):
    """TensorFlow's CPU-only start-up noise goes; any other line on fd 2 stays."""
    result = filtered(
        "os.write(2, b'E0000 cuda_platform.cc:52] failed call to cuInit: INTERNAL: x\\n')\n"
        "os.write(2, b'E0000 node_def_util.cc:682] NodeDef mentions attribute use_unbounded"
        "_threadpool which is not in the op definition: Op<...>\\n')\n"
        "os.write(2, b'I0000 port.cc:153] oneDNN custom operations are on. You may see\\n')\n"
        "os.write(2, b'E0000 real_op.cc:1] a real TensorFlow error\\n')\n"
        "raise SystemExit('error: the last word')\n"
    )
    assert "a real TensorFlow error" in result.stderr
    assert "error: the last word" in result.stderr
    assert "NodeDef" not in result.stderr and "oneDNN" not in result.stderr
    from mnist_pipeline.core.log_filter import has_nvidia_driver, noise_patterns

    assert ("cuInit" in result.stderr) == has_nvidia_driver()
    # Where a GPU driver exists, a failing cuInit is a real problem and is shown.
    assert not noise_patterns(gpu=True).search(b"failed call to cuInit: CUDA_ERROR")


def test_noise_filter_ends_with_the_process_while_a_library_holds_fd_2():
    """A library that keeps its own copy of fd 2 (vl-convert's runtime does) holds the
    filter's pipe open: the filter still ends at exit, at once, and passes on a last line
    with no newline. It once waited out a 5 s join on every such process."""
    result = filtered(
        "import atexit, threading\n"
        "kept = os.dup(2)\n"  # what the library does; never closed
        "os.write(2, b'the last words, no newline')\n"
        "atexit._run_exitfuncs()\n"
        "alive = [t.name for t in threading.enumerate() if t.name == 'stderr-filter']\n"
        "print('pump alive' if alive else 'pump ended')\n"
    )
    assert result.stdout.strip() == "pump ended", result.stderr
    assert result.stderr == "the last words, no newline"


def test_make_help_lists_every_target():
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    out = subprocess.run(
        [make, "-s", "help"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60
    ).stdout
    phony = next(
        line
        for line in (PROJECT_ROOT / "Makefile").read_text().splitlines()
        if line.startswith(".PHONY:")
    ).split()[1:]
    for target in phony:
        lines = [line for line in out.splitlines() if line.split()[:2] == ["make", target]]
        assert len(lines) == 1, (target, out)
        assert len(lines[0].split()) > 3  # a description, not just the name


#: Every module a person runs with ``python -m``: found, not listed, so a new one is covered.
COMMANDS = sorted(
    path.stem
    for path in (PROJECT_ROOT / "src/mnist_pipeline").glob("*.py")
    if 'if __name__ == "__main__":' in path.read_text()
)


def test_the_commands_are_found():
    assert {"download", "preprocess", "train", "evaluate", "ui", "serve"} <= set(COMMANDS)


@pytest.mark.parametrize("module", COMMANDS)
def test_every_cli_answers_help(module, capsys):
    """In this process (the imports are paid once): ``--help`` exits 0 with a usage text."""
    assert run_module(module, "--help") == 0
    out = capsys.readouterr().out
    assert "usage" in out.lower()
    if module in ("download", "train"):
        for part in ("Reads:", "Writes:", "Logs:", "Main keys:"):
            assert part in out
    if module == "train":
        assert "models/" in out and "optimizer.learning_rate" in out


def test_help_through_the_real_command():
    """The wiring, once, as the shell runs it: ``python -m`` finds the module, Hydra's help
    template is filled from its docstring, nothing else is printed."""
    result = subprocess.run(
        [sys.executable, "-m", "mnist_pipeline.train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PROJECT_ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "Reads:" in result.stdout and "optimizer.learning_rate" in result.stdout
    assert result.stderr == ""


def test_percent_encoded_file_url():
    assert Mirror.parse("file:///srv/my%20work/mnist").location == "/srv/my work/mnist"


HDF5_FULL = "Can't write data (file write failed: errno = 28, error message = 'No space left')"


@pytest.mark.parametrize(
    "exc",
    [
        OSError("Not enough free space to write 188160000 bytes after offset 128"),  # NumPy
        OSError("141120 requested and 16352 written"),  # NumPy, a short write
        OSError(28, "No space left on device"),  # no file name
        RuntimeError(HDF5_FULL.replace("left", "left on device")),  # HDF5, in text only
    ],
)
def test_a_full_disk_is_recognised_whatever_the_library_says(exc, tmp_path):
    """One line for a full disk however a library reports it; naming the output once
    ``atomic`` has re-raised it for the staged file."""
    from mnist_pipeline.core import atomic, diagnosis

    tail = ": free space there and run again (no output was replaced)"
    assert diagnosis.describe(exc) == diagnosis.SOMEWHERE_FULL + tail
    final = tmp_path / "x.npy"
    if isinstance(exc, OSError):
        named = atomic.full_disk(exc, {final: tmp_path / ".x.npy.tmp"})
        try:
            raise named from exc
        except OSError as raised:
            assert diagnosis.describe(raised) == f"no space left on the disk holding {final}{tail}"
    # Another error with no errno, on a disk with room, is left alone (a bug, not the disk).
    assert atomic.full_disk(OSError("something else"), {final: tmp_path / "x.tmp"}) is None
