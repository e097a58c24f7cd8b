"""`make ui`: run names, the saved runs-table view, and what a person sees in a real browser.

The browser test fills a store the way a user does (a `dvc repro`, a `dvc exp run` and a
2-job sweep, on tiny data, in a copy of the project), starts `python -m mnist_pipeline.ui`
(what `make ui` runs) on a free port, opens the address it prints in Debian's Chromium with a
fresh profile, and checks the page's text. With MNIST_SCREENSHOTS=<folder> it also saves the
pictures the docs show (`make screenshots`).
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from mnist_pipeline.core.supervised import Server, free_port
from mnist_pipeline.experiments import ui
from mnist_pipeline.tracking import names
from tests.helpers.browser import loopback_only
from tests.helpers.data import TRAIN_SIZE
from tests.helpers.workspace import copy_reproduced

pytestmark = pytest.mark.heavy

CHROMIUM = "/usr/bin/chromium"


# --- run names ------------------------------------------------------------------------------


def fake_proc(root: Path, processes: dict[int, tuple[int, str, list[str]]]) -> Path:
    """A /proc with ``pid: (ppid, start ticks, argv)`` entries; boot at 2026-11-30 00:00:00."""
    boot = int(datetime(2026, 11, 30).timestamp())
    (root / "stat").parent.mkdir(parents=True, exist_ok=True)
    (root / "stat").write_text(f"cpu  1 2 3\nbtime {boot}\nprocesses 9\n")
    for pid, (ppid, ticks, argv) in processes.items():
        folder = root / str(pid)
        folder.mkdir()
        rest = " ".join(["S", str(ppid), *["0"] * 17, str(ticks), "0"])
        (folder / "stat").write_text(f"{pid} (odd name) x) {rest}\n")
        (folder / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    return root


def test_a_dvc_run_is_named_by_its_dvc_process(tmp_path, monkeypatch):
    tick = os.sysconf("SC_CLK_TCK")
    own = os.getpid()
    proc = fake_proc(
        tmp_path / "proc",
        {
            own: (500, 3600 * tick, ["python", "-m", "mnist_pipeline.train"]),
            500: (400, 3599 * tick, ["/bin/sh", "-c", "PYTHONPATH=src python -m ..."]),
            400: (1, (4 * 3600 + 12 * 60 + 33) * tick, ["/x/.venv/bin/python", "/x/dvc", "repro"]),
        },
    )
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    name = names.pipeline_run_name(proc=proc)
    assert name == "repro 11-30 04:12:33"
    # Two repros started at different times are told apart; a DVC experiment has its name.
    proc = fake_proc(
        tmp_path / "proc2",
        {own: (400, 1, ["python"]), 400: (1, 5 * 3600 * tick, ["dvc", "-q", "repro", "-f"])},
    )
    assert names.pipeline_run_name(proc=proc) == "repro 11-30 05:00:00"
    assert names.pipeline_run_name({"DVC_EXP_NAME": "tiny-exp"}, proc=proc) == "tiny-exp"
    assert names.run_name("train", "tiny-exp") == "tiny-exp"
    assert names.run_name("download", "tiny-exp") == "tiny-exp (download)"


def test_without_dvc_a_run_is_named_by_its_start(tmp_path):
    tick = os.sysconf("SC_CLK_TCK")
    proc = fake_proc(tmp_path / "proc", {os.getpid(): (1, 7200 * tick, ["python", "x.py"])})
    assert names.pipeline_run_name({}, proc=proc) == "run 11-30 02:00:00"
    # No /proc at all (macOS): still a name, from the clock.
    assert names.pipeline_run_name({}, proc=tmp_path / "none").startswith("run ")


def test_sweep_jobs_are_named_by_their_own_overrides():
    sweep = ["model.units=128,512", "train.epochs=5,20", "seed=1", "hydra/launcher=joblib"]
    job = ["model.units=128", "train.epochs=20", "seed=1", "hydra/launcher=joblib"]
    assert names.job_name(job, sweep, 3) == "units=128 epochs=20"
    # Shortened keys that would collide stay whole; a job with nothing of its own is numbered.
    job = ["optimizer=sgd", "optimizer.learning_rate=0.1"]
    assert names.job_name(job, [], 0) == "optimizer=sgd learning_rate=0.1"
    job = ["a.x=1", "b.x=2"]
    assert names.job_name(job, ["a.x=1,3", "b.x=2,4"], 1) == "a.x=1 b.x=2"
    assert names.job_name(["seed=1"], ["seed=1"], 4) == "job4"


def test_the_view_names_columns_as_the_mlflow_ui_does():
    state = ui.view_state(["model.units", "train.epochs"])
    assert state["selectedColumns"][:3] == [
        "metrics.`test_accuracy`",
        "metrics.`train_accuracy`",
        "metrics.`accuracy_gap`",
    ]
    assert "params.`model.units`" in state["selectedColumns"]
    address = ui.address("http://127.0.0.1:5001", "7")
    assert address == (
        "http://127.0.0.1:5001/#/experiments/7/runs"
        "?workflowType=machine_learning&viewStateShareKey=mnist-compare"
    )


def test_a_busy_port_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "mnist_pipeline.ui", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert f"make ui PORT={port + 1}" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing written for a server never started


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not a database" * 300, "is corrupt (file is not a database)"),  # damaged
        (b"", None),  # an empty file is a fresh store: it starts
    ],
)
def test_a_store_the_server_cannot_open_is_a_one_line_error(tmp_path, content, reason):
    store = tmp_path / "dir with space" / "mlflow.db"
    store.parent.mkdir()
    store.write_bytes(content)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    server = UiServer(env, free_port(), tmp_path / "ui.log")
    try:
        if reason is None:
            assert "workflowType=machine_learning" in server.address(timeout_s=300)
            return
        server.process.wait(timeout=300)
    finally:
        server.close()
    err = (tmp_path / "ui.log").read_text()
    assert server.process.returncode == 1
    assert err.startswith("error: ") and reason in err, err
    assert len(err.strip().splitlines()) == 1, err  # no traceback
    assert store.read_bytes() == content  # left as it was


def test_a_server_that_dies_says_why_in_one_line(tmp_path):
    """Options ``make ui`` does not know go to ``mlflow server``; one it rejects ends the
    launcher with the server's own reason, not its traceback or usage text."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    server = UiServer(env, free_port(), tmp_path / "ui.log", extra=["--no-such-option"])
    try:
        server.process.wait(timeout=300)
    finally:
        server.close()
    err = (tmp_path / "ui.log").read_text()
    assert server.process.returncode == 1
    assert err.startswith("error: mlflow server exited with status 2: "), err
    assert "--no-such-option" in err and len(err.strip().splitlines()) == 1, err


# --- the browser test -----------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, f"{cmd} failed:\n{output}"
    return result.stdout + result.stderr


def fill_store(template: Path, root: Path, mirror: Path) -> tuple[Path, dict]:
    """What a user does after cloning, on tiny data: `dvc repro` (a copy of the session's
    reproduced ``template``), a `dvc exp run` and a 2-job sweep, all into the project's own
    store (``mlflow.db`` in the project, where a plain `mlflow ui` there finds it), in a
    folder with a space."""
    repo, env = copy_reproduced(template, root / "my project", mirror, store_in_repo=True)
    env["PYTHONPATH"] = "src"
    # A validation split, so that the experiment has validation curves too.
    exp = ["-n", "tiny-exp", "-S", "train.epochs=2", "-S", "data.val_split=0.25"]
    _run(["dvc", "exp", "run", *exp], repo, env)
    _run([sys.executable, "-m", "mnist_pipeline.pipeline", "-m", "model.units=16,24"], repo, env)
    return repo, env


def chromium_or_skip() -> str:
    if shutil.which(CHROMIUM) is None:
        message = f"{CHROMIUM} not found (Debian: apt-get install chromium)"
        if os.environ.get("MNIST_REQUIRE_SERVICES"):
            pytest.fail(message)  # .ci/run installs it: a skip would hide a broken setup
        pytest.skip(message)
    return CHROMIUM


class UiServer:
    """`python -m mnist_pipeline.ui` (what `make ui` runs) on a free port, until closed."""

    def __init__(self, env: dict, port: int, log: Path, extra: list[str] = ()) -> None:
        self.log = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mnist_pipeline.ui", "--port", str(port), *extra],
            env=env,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self.started = time.monotonic()
        self.printed = ""

    def address(self, timeout_s: float) -> str:
        """The address it prints once the server answers (read by a thread: a pipe read
        with a timeout would lose lines to Python's buffer)."""
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(
            target=lambda: [lines.put(line) for line in self.process.stdout], daemon=True
        ).start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            self.printed += line
            if "#/experiments/" in line:
                return line.strip()
        raise AssertionError(f"no address printed:\n{self.printed}\n{self.log.name}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # it stops its server, then exits
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def filled(tmp_path_factory, tiny_mirror, reproduced_template):
    assert TRAIN_SIZE  # the tiny data set of conftest
    return fill_store(reproduced_template.folder, tmp_path_factory.mktemp("ui"), tiny_mirror[0])


def runs_by_name(env: dict) -> dict[str, object]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("mnist")
    return {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


def row_text(page, name: str) -> str:
    """The text of the runs-table row whose run name is ``name`` (the grid draws the pinned
    name column and the scrolling columns as separate row elements with one row index)."""
    cell = page.get_by_role("link", name=name, exact=True).first
    index = cell.locator("xpath=ancestor::*[@row-index][1]").get_attribute("row-index")
    rows = page.locator(f'[role="row"][row-index="{index}"]')
    return " | ".join(rows.nth(i).inner_text() for i in range(rows.count()))


@pytest.mark.slow
def test_a_person_compares_runs_in_the_browser(filled, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    executable = chromium_or_skip()
    _, env = filled

    runs = runs_by_name(env)
    shots = Path(os.environ.get("MNIST_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)

    # The names say where each run came from (point 2), and one repro's stages share theirs (4).
    train_runs = {n: r for n, r in runs.items() if r.data.tags.get("stage") == "train"}
    repros = [n for n in train_runs if re.fullmatch(r"repro \d\d-\d\d \d\d:\d\d:\d\d", n)]
    assert len(repros) == 1, sorted(runs)
    repro = repros[0]
    assert {"tiny-exp", "units=16", "units=24"} <= set(train_runs), sorted(runs)
    assert {f"{repro} (download)", f"{repro} (preprocess)"} <= set(runs), sorted(runs)
    for stage in ("download", "preprocess"):  # folded under the training run (issue 23)
        parent = runs[f"{repro} ({stage})"].data.tags.get("mlflow.parentRunId")
        assert parent == train_runs[repro].info.run_id, (stage, parent)
    sweeps = [n for n in runs if n.startswith("sweep ") and "(" not in n]
    assert len(sweeps) == 1 and sweeps[0].endswith(": model.units=16,24"), sorted(runs)
    sweep = sweeps[0]
    # Every run is a pipeline run's training run, a sweep, or folded under one of them.
    top = sorted(n for n, r in runs.items() if "mlflow.parentRunId" not in r.data.tags)
    assert top == sorted([repro, "tiny-exp", sweep]), top

    server = UiServer(env, free_port(), tmp_path / "ui.log")
    try:
        address = server.address(timeout_s=300)
        print(f"make ui printed its address after {time.monotonic() - server.started:.1f} s")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
            context = browser.new_context(viewport={"width": 1400, "height": 760})  # fresh
            refused: list[str] = []
            loopback_only(context, refused)
            page = context.new_page()
            page.goto(address)

            # 1. A model-training experiment: its runs, not GenAI traces.
            # (GenAI mode has an Overview, Judges and a "Training runs" tab instead.)
            expect(page.get_by_role("heading", name="Runs", exact=True)).to_be_visible(
                timeout=90_000
            )
            expect(page.get_by_role("link", name=repro, exact=True)).to_be_visible(timeout=60_000)
            nav = page.locator("aside, nav").first.inner_text().splitlines()
            assert "Runs" in nav and "Model registry" in nav, nav
            assert not {"Overview", "Judges", "Training runs"} & set(nav), nav
            body = page.inner_text("body")
            assert "Detect Issues" not in body and "No data available" not in body
            _close_assistant(page)

            # 3. Every training run's headline metrics, side by side, with no click.
            for name in (repro, "tiny-exp"):
                text = row_text(page, name)
                for metric in ui.METRICS:
                    value = train_runs[name].data.metrics[metric]
                    assert repr(value) in text, (name, metric, value, text)
            # The params that differ come after the metrics (the grid draws only the columns
            # in sight: the first one is enough).
            assert "data.val_split" in body or "model.units" in body, body
            # One row per pipeline run: its data stages' runs are folded under it, not beside.
            data_runs = (f"{repro} (download)", f"{repro} (preprocess)")
            for name in data_runs:
                assert page.get_by_role("link", name=name, exact=True).count() == 0, name
            _shot(page, shots / "1-runs.png")
            page.get_by_role("row").filter(has_text=repro).get_by_role("button").first.click()
            for name in data_runs:
                expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()
            page.get_by_role("row").filter(has_text=repro).get_by_role("button").first.click()

            # 2/4. The sweep's parent opens onto its jobs, named by their overrides.
            page.get_by_role("row").filter(has_text=sweep).get_by_role("button").first.click()
            for job in ("units=16", "units=24"):
                expect(page.get_by_text(job, exact=True)).to_be_visible()
                text = row_text(page, job)
                assert repr(train_runs[job].data.metrics["test_accuracy"]) in text, text
            _shot(page, shots / "2-sweep.png")

            # 5. A train run's page: the config, the learning curves, the confusion matrix.
            # (Following a link drops workflowType: the left bar turns to GenAI's menu
            # unless the person clicked "Model training" once; the run's page is the same.)
            page.get_by_role("link", name="tiny-exp", exact=True).first.click()
            expect(page.get_by_role("tab", name="Model metrics")).to_be_visible(timeout=60_000)
            expect(page.get_by_text("pipeline_run").first).to_be_visible(timeout=30_000)
            _close_assistant(page)
            _shot(page, shots / "3-run.png")
            page.get_by_role("tab", name="Model metrics").click()
            page.get_by_role("searchbox", name="Search metric charts").fill(
                "^(val_)?(accuracy|loss)$"
            )
            for chart in ("accuracy", "loss", "val_accuracy", "val_loss"):
                heading = page.get_by_role("heading", name=chart, exact=True)
                expect(heading).to_be_visible(timeout=30_000)
            if os.environ.get("MNIST_SCREENSHOTS"):
                page.wait_for_timeout(5_000)  # the charts draw after their data arrives
            _shot(page, shots / "4-metrics.png")
            page.get_by_role("tab", name="Artifacts").click()
            page.get_by_text("confusion_matrix.png", exact=True).click()
            picture = page.get_by_role("img", name="confusion_matrix.png")
            expect(picture).to_be_visible(timeout=30_000)
            # The whole picture, down to its "predicted" axis label, in sight.
            page.set_viewport_size({"width": 1400, "height": 940})
            page.wait_for_timeout(500)
            box = picture.bounding_box()
            assert box and box["height"] > 300 and box["y"] + box["height"] <= 940, box
            _shot(page, shots / "5-artifacts.png")
            browser.close()
        assert refused == [], f"the UI asked for addresses off this machine: {refused}"
    finally:
        server.close()
    assert server.process.returncode == 0, server.printed


@pytest.mark.slow
def test_plain_mlflow_ui_in_the_activated_environment(filled, tmp_path):
    """`source .venv/bin/activate && mlflow ui` in the project: MLflow's own command, its own
    defaults (./mlflow.db, four workers). A person opens the address, the experiment, clicks
    "Model training" when MLflow opens it in GenAI mode, and sees one row per pipeline run.
    (It stopped on `No module named 'flask'` while MLflow's server had an environment of its
    own.)"""
    from playwright.sync_api import expect, sync_playwright

    executable = chromium_or_skip()
    repo, env = filled
    runs = runs_by_name(env)
    repro = next(n for n in runs if re.fullmatch(r"repro \d\d-\d\d \d\d:\d\d:\d\d", n))
    venv_bin = str(Path(sys.executable).parent)
    activated = {k: v for k, v in env.items() if not k.startswith("MLFLOW_")}
    activated |= {
        "VIRTUAL_ENV": str(Path(venv_bin).parent),
        "PATH": f"{venv_bin}:{os.environ['PATH']}",
    }
    mlflow_script = shutil.which("mlflow", path=activated["PATH"])
    assert mlflow_script == str(Path(venv_bin) / "mlflow")  # the venv's own, first on PATH
    port = free_port()
    shm_before = set(Path("/dev/shm").glob("tmp*"))
    with (
        (tmp_path / "mlflow-ui.log").open("w") as log,
        _removing_new(Path("/dev/shm"), shm_before),
        Server(
            [mlflow_script, "ui", "--port", str(port)],
            f"http://127.0.0.1:{port}/health",
            env=activated,
            cwd=repo,
            stdout=log,
            stderr=subprocess.STDOUT,
        ) as server,
    ):
        server.wait_until_up(timeout_s=180)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
            context = browser.new_context(viewport={"width": 1400, "height": 760})
            refused: list[str] = []
            loopback_only(context, refused)
            page = context.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_role("link", name="mnist", exact=True).first.click(timeout=90_000)
            switch = page.get_by_text("Model training", exact=True).first
            switch.wait_for(timeout=60_000)
            switch.click()
            expect(page.get_by_role("link", name=repro, exact=True)).to_be_visible(timeout=60_000)
            for name in ("tiny-exp", *(n for n in runs if n.startswith("sweep ") and "(" not in n)):
                expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()
            for stage in ("download", "preprocess"):  # folded under their pipeline run
                assert page.get_by_role("link", name=f"{repro} ({stage})").count() == 0
            browser.close()
        assert refused == [], f"the UI asked for addresses off this machine: {refused}"


@contextlib.contextmanager
def _removing_new(folder: Path, before: set[Path]) -> Iterator[None]:
    """Remove what appears in ``folder`` meanwhile: plain `mlflow ui` (MLflow 3.17.2) makes a
    /dev/shm folder for its GenAI job runner and never removes it (the project's own servers
    run without that runner, ``mnist_pipeline.MLFLOW_JOBS_OFF``); a test leaves nothing."""
    try:
        yield
    finally:
        for path in set(folder.glob("tmp*")) - before:
            shutil.rmtree(path, ignore_errors=True)


def _shot(page, path: Path) -> None:
    """A screenshot, in 256 colours: the docs' pictures stay small."""
    from PIL import Image

    page.screenshot(path=str(path))
    Image.open(path).quantize(256).save(path, optimize=True)


def _close_assistant(page) -> None:
    """The assistant panel (MLflow's LLM chat) takes a third of the width; a person closes it
    with the Close button in its header, beside "New Chat"."""
    new_chat = page.get_by_role("button", name="New Chat")
    try:
        new_chat.wait_for(timeout=15_000)
    except Exception:  # not shown (a later MLflow may open it on demand only)
        return
    right = new_chat.bounding_box()["x"]
    for button in page.get_by_role("button", name="Close", exact=True).all():
        box = button.bounding_box()
        if box and box["x"] > right and abs(box["y"] - new_chat.bounding_box()["y"]) < 20:
            button.click()
            break
    expect_hidden(new_chat)


def expect_hidden(locator) -> None:
    from playwright.sync_api import expect

    expect(locator).to_be_hidden(timeout=10_000)
