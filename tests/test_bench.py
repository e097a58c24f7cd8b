"""The benchmark's baseline environment stays what the issue asks: TensorFlow, Keras and
NumPy alone, pinned exactly as uv.lock pins them (bench/tf_requirements.py); its serving
loads send requests the server takes."""

import importlib.util
import shutil
import subprocess
import tomllib

import pytest

from mnist_pipeline.core.project import PROJECT_ROOT

spec = importlib.util.spec_from_file_location(
    "tf_requirements", PROJECT_ROOT / "bench/tf_requirements.py"
)
tf_requirements = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tf_requirements)

COMMITTED = (PROJECT_ROOT / "bench/requirements-tf.txt").read_text()


def test_pins_are_uv_lock_s_versions():
    lock = tomllib.loads((PROJECT_ROOT / "uv.lock").read_text())
    locked = {(tf_requirements._normal(p["name"]), p["version"]) for p in lock["package"]}
    pins = tf_requirements.pins(COMMITTED)
    assert pins <= locked, pins - locked
    names = {name for name, _ in pins}
    assert {"tensorflow", "keras", "numpy"} <= names
    # What the stages' environment adds, and the baseline must not have.
    assert not names & {"mlflow", "pandas", "scikit-learn", "scipy", "matplotlib", "pyarrow"}
    assert "--hash=sha256:" in COMMITTED


@pytest.mark.skipif(shutil.which("uv") is None, reason="uv not on PATH")
def test_committed_file_is_up_to_date_with_uv_lock():
    """A dependency bump in uv.lock must come with a regenerated baseline (make bench does
    it; this catches a commit that forgot)."""
    wanted = tf_requirements.requirements(
        (PROJECT_ROOT / "uv.lock").read_text(), tf_requirements.exported()
    )
    assert wanted == COMMITTED


def test_closure_follows_dependencies_and_extras():
    lock = {
        "package": [
            {"name": "a", "version": "1", "dependencies": [{"name": "b", "extra": ["x"]}]},
            {"name": "b", "version": "2", "optional-dependencies": {"x": [{"name": "c"}]}},
            {"name": "c", "version": "3"},
            {"name": "d", "version": "4"},
        ]
    }
    assert tf_requirements.closure(lock, ("a",)) == {"a", "b", "c"}


def test_make_bench_builds_the_baseline_environment_first(tmp_path):
    """In a fresh clone (no bench/.venv-tf), `make bench` must build the baseline's
    environment before timing anything; a prerequisite variable defined after the rule
    reads as empty and the step is silently skipped."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for name in ("Makefile", "pyproject.toml", "uv.lock"):
        shutil.copy(PROJECT_ROOT / name, tmp_path / name)
    result = subprocess.run(
        ["make", "-n", "bench"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    commands = result.stdout
    assert result.returncode == 0, result.stderr
    assert "pip sync --quiet --python bench/.venv-tf/bin/python" in commands, commands
    assert commands.index(".venv-tf/bin/python bench/requirements-tf.txt") < commands.index(
        "-m bench.run"
    )


def test_serving_requests_are_what_the_contract_takes(prepared, tmp_path):
    """The bench's request bodies, made from the stored test pixels, pass the serving
    contract: a load of refused requests would time the refusal, not the model."""
    import json
    from pathlib import Path

    from bench.serving import payloads
    from mnist_pipeline.serving.contract import check_pixels

    for images, body in payloads(Path(prepared.paths.processed), tmp_path).items():
        x = check_pixels(json.loads(body.read_text())["inputs"])
        assert x.shape == (images, 784) and 0 < x.max() <= 1
