"""From a run to a prediction: the serving contract, picture formatting, the registry with its
promotion rule, `predict` on real PNG files, and the real scoring server over HTTP."""

from __future__ import annotations

import csv
import http.client
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from mnist_pipeline import tracking
from mnist_pipeline.core.errors import DataError
from mnist_pipeline.core.supervised import free_port
from mnist_pipeline.serving import app, contract, images, registry
from mnist_pipeline.stages.artifacts import MNIST_FILES, RUN_FILE
from mnist_pipeline.stages.idx import to_idx_bytes, write_idx
from tests.helpers.cli import exit_code
from tests.helpers.config import compose_config, sha_overrides
from tests.helpers.only_installed import run_with_only
from tests.helpers.processes import run_stage
from tests.helpers.services import started

pytestmark = pytest.mark.heavy

# --- the contract, without a model ------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (np.full((1, 784), 255.0), "divide them by 255"),
        (np.full((2, 784), -0.5), "must be in [0, 1]"),
        (np.full((1, 784), np.nan), "finite"),
        (np.zeros((1, 28, 28)), "shape (n, 784)"),
        (np.zeros((1, 783)), "shape (n, 784)"),
        ([["a"] * 784], "must be numbers"),
    ],
)
def test_contract_refuses_inputs_outside_it(bad, says):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as caught:
        contract.check_pixels(bad)
    assert says in caught.value.message
    assert caught.value.get_http_status_code() == 400


def test_contract_output_names_the_digit():
    p = np.full((2, 10), 0.01)
    p[0, 7], p[1, 3] = 0.91, 0.91
    out = contract.summarize(p)
    assert out["digit"].tolist() == [7, 3]
    assert out["probability"].tolist() == pytest.approx([0.91, 0.91])
    assert len(out["probabilities"][0]) == 10


# --- pictures -> MNIST format ---------------------------------------------------------


def draw_digit(digit: int, size: int, ink: int, paper: int, shape=(200, 140), at=(30, 10)):
    """A digit drawn with Pillow's own font: any size, position and colour."""
    canvas = Image.new("L", shape[::-1], paper)
    font = ImageFont.load_default(size=size)
    ImageDraw.Draw(canvas).text(at, str(digit), fill=ink, font=font, stroke_width=size // 14)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def test_to_mnist_makes_the_format_mnist_was_made_in():
    """Dark ink on light paper, large and off centre -> white on black, the longer side 20
    pixels, the centre of mass in the middle of 28x28, values in [0, 1]."""
    out = images.to_mnist(draw_digit(7, size=120, ink=30, paper=230, at=(5, 40)))
    assert out.shape == (28, 28) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == pytest.approx(1.0, abs=0.01)
    assert out[0].sum() == 0 and out[:, 0].sum() == 0  # background is black: inverted
    rows, cols = np.nonzero(out)
    assert max(np.ptp(rows), np.ptp(cols)) + 1 == 20
    cy, cx = (np.indices(out.shape) * out).sum(axis=(1, 2)) / out.sum()
    assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5
    # The same digit white on black, smaller, elsewhere: nearly the same picture.
    other = images.to_mnist(draw_digit(7, size=60, ink=255, paper=0, at=(40, 90)))
    assert np.abs(out - other).mean() < 0.08


def test_to_mnist_keeps_an_mnist_digit_as_it_is():
    """A digit already in MNIST's format (fitted, centred) comes back nearly unchanged."""
    once = images.to_mnist(draw_digit(4, size=80, ink=255, paper=0))
    twice = images.to_mnist(once)
    assert np.abs(once - twice).max() < 0.15


def test_example_digits_are_pictures_predict_reads(tmp_path, monkeypatch):
    """tools/example_digits.py (the README's `digits/`): every file but the text one is a
    picture `predict` turns into MNIST's format."""
    from tools import example_digits

    monkeypatch.chdir(tmp_path)
    images_, labels = rendered_digits(8, seed=3)
    (tmp_path / "data/raw").mkdir(parents=True)
    for key, array in (("test_images", images_), ("test_labels", labels)):
        write_idx(tmp_path / "data/raw" / MNIST_FILES[key], array)
    files = example_digits.write(tmp_path / "digits")
    assert len(files) == 12 and len({f.name for f in files}) == 12
    for f in files:
        if f.suffix == ".txt":
            with pytest.raises(DataError, match="not an image file"):
                images.image_to_pixels(f)
        else:
            pixels = images.image_to_pixels(f)
            assert pixels.shape == (784,) and pixels.max() == pytest.approx(1.0), f.name


def test_load_image_refuses_what_is_not_a_picture(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(DataError, match="not an image"):
        images.load_image(text)
    blank = tmp_path / "blank.png"
    Image.new("RGB", (50, 50), "white").save(blank)
    with pytest.raises(DataError, match="no digit found"):
        images.image_to_pixels(blank)


def test_colour_and_transparency(tmp_path):
    """A blue digit on transparent background and the same digit black on white agree."""
    grey = draw_digit(2, size=90, ink=255, paper=0)
    alpha = Image.fromarray(np.round(grey * 255).astype(np.uint8))
    rgba = Image.new("RGBA", alpha.size, (0, 0, 255, 0))
    rgba.putalpha(alpha)
    rgba.save(tmp_path / "blue.png")
    Image.fromarray(np.round((1 - grey) * 255).astype(np.uint8)).save(tmp_path / "plain.jpg")
    a = images.image_to_pixels(tmp_path / "blue.png")
    b = images.image_to_pixels(tmp_path / "plain.jpg")
    assert np.abs(a - b).mean() < 0.05


# --- the promotion rule ---------------------------------------------------------------


def test_promotion_rule():
    cfg = compose_config(["registry.max_gap=0.02", "registry.min_improvement=0.001"])
    champion = registry.Version("1", "r1", test_accuracy=0.970, accuracy_gap=0.010)
    better = registry.Version("2", "r2", test_accuracy=0.975, accuracy_gap=0.015)
    assert registry.decide(better, champion, cfg) == []
    assert registry.decide(better, None, cfg) == []
    barely = registry.Version("3", "r3", test_accuracy=0.9705, accuracy_gap=0.01)
    assert "does not beat" in registry.decide(barely, champion, cfg)[0]
    overfit = registry.Version("4", "r4", test_accuracy=0.99, accuracy_gap=0.05)
    assert "exceeds registry.max_gap" in registry.decide(overfit, champion, cfg)[0]
    worse = registry.Version("5", "r5", test_accuracy=0.96, accuracy_gap=0.05)
    assert len(registry.decide(worse, champion, cfg)) == 2


# --- end to end on tiny, learnable data -------------------------------------------------

TRAIN_N, TEST_N = 500, 100


def rendered_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Tiny MNIST-format data a small network learns in seconds: digits drawn with
    Pillow's font at random sizes, positions, strokes and slants, then formatted as MNIST
    was (``images.to_mnist``)."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    out = np.empty((n, 28, 28), dtype=np.uint8)
    for i, digit in enumerate(labels):
        canvas = Image.new("L", (64, 64), 0)
        font = ImageFont.load_default(size=int(rng.integers(28, 48)))
        at = (int(rng.integers(4, 20)), int(rng.integers(0, 12)))
        ImageDraw.Draw(canvas).text(
            at, str(digit), fill=255, font=font, stroke_width=int(rng.integers(1, 3))
        )
        canvas = canvas.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR)
        formatted = images.to_mnist(np.asarray(canvas, dtype=np.float32) / 255.0)
        out[i] = np.round(formatted * 255).astype(np.uint8)
    return out, labels


class ScoringServer:
    """``python -m mnist_pipeline.serve`` (what ``make serve`` runs: the project's app under
    uvicorn once the model is found) for a model URI, on a free loopback port, stopped by
    close()."""

    def __init__(self, model_uri: str, env: dict, log: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        port = self.url.rsplit(":", 1)[1]
        command = [sys.executable, "-m", "mnist_pipeline.serve", "--model", model_uri]
        # One worker: these tests are about the answers (the worker count has its own test).
        command += ["--port", port, "--workers", "1"]
        self.log = log
        self.server = started(command, self.url + "/ping", env, log, timeout_s=240)
        self.process = self.server.process

    def post(
        self, body: bytes | str, content_type="application/json", chunked: bool = False
    ) -> tuple[int, str]:
        data = body.encode() if isinstance(body, str) else body
        headers = {"Content-Type": content_type}
        if chunked:  # no Content-Length: the server finds the size only by reading
            data, headers["Transfer-Encoding"] = iter([data]), "chunked"
        request = urllib.request.Request(self.url + "/invocations", data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def close(self) -> None:
        self.server.stop(grace_s=30)


def terminated_under_load(server: ScoringServer, body: str, clients: int = 4) -> tuple:
    """SIGTERM to the server while ``clients`` threads post ``body`` in a loop: how each
    request ended ("200", another status, "truncated", "connection closed") and the server's
    exit status."""
    host, port = server.url.removeprefix("http://").split(":")
    outcomes: Counter = Counter()
    stop = threading.Event()

    def client() -> None:
        connection = None
        while not stop.is_set():
            try:
                if connection is None:
                    connection = http.client.HTTPConnection(host, int(port), timeout=30)
                connection.request(
                    "POST", "/invocations", body, {"Content-Type": "application/json"}
                )
                response = connection.getresponse()
                answer = response.read()
                json.loads(answer)
                outcomes[str(response.status)] += 1
            except (OSError, http.client.HTTPException):
                outcomes["connection closed"] += 1
                connection = None
                stop.wait(0.05)
            except ValueError:
                outcomes["truncated"] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    while not outcomes["200"]:
        time.sleep(0.05)
    server.process.send_signal(signal.SIGTERM)
    try:
        code = server.process.wait(timeout=60)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return outcomes, code


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A pipeline run on rendered digits, in process, with a fresh SQLite store: returns
    (working folder, the store's URI, the config, the evaluate stage's metrics)."""
    import mlflow

    from mnist_pipeline.stages import download, evaluate, preprocess, train

    root = tmp_path_factory.mktemp("serving")
    mirror, work = root / "mirror", root / "work"
    mirror.mkdir()
    work.mkdir()
    arrays = dict(
        zip(("train_images", "train_labels"), rendered_digits(TRAIN_N, seed=1), strict=True)
    )
    arrays.update(zip(("test_images", "test_labels"), rendered_digits(TEST_N, 2), strict=True))
    sha = {}
    for key, array in arrays.items():
        write_idx(mirror / MNIST_FILES[key], array)
        import hashlib

        sha[key] = hashlib.sha256(to_idx_bytes(array)).hexdigest()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MNIST_MIRROR", str(mirror))
        mp.setattr("mnist_pipeline.stages.download.DEFAULT_MIRRORS", ())
        mlflow.set_tracking_uri(uri)
        cfg = compose_config([*sha_overrides(sha), "train.epochs=15", "model.units=64"])
        download.download(cfg)
        preprocess.preprocess(cfg)
        train.train(cfg)
        metrics = evaluate.evaluate(cfg)
        yield work, uri, cfg, metrics, arrays
        mlflow.set_tracking_uri(None)


@pytest.fixture
def in_project(trained, monkeypatch):
    """This test runs in the trained project's folder, against its store."""
    import mlflow

    work, uri = trained[0], trained[1]
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield trained
    mlflow.set_tracking_uri(None)


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 7, 1024, 2500])
def test_fast_path_gives_predicts_bits(in_project, n):
    """classify calls predict_on_batch in chunks of BATCH: the same bits as Keras's
    ``predict(batch_size=BATCH)``, for one image, a few, one full chunk and a ragged tail."""
    from mnist_pipeline.serving import contract
    from mnist_pipeline.stages import artifacts

    model = artifacts.load_model(Path(in_project[2].paths.models))
    x = np.random.default_rng(n).random((n, contract.PIXELS), dtype=np.float32)
    slow = model.predict(x, batch_size=contract.BATCH, verbose=0)
    fast = contract.classify(model, x)
    assert np.array_equal(np.array(fast["probabilities"].tolist(), dtype=np.float32), slow)
    assert list(fast["digit"]) == list(slow.argmax(axis=1))


@pytest.mark.slow
def test_register_promote_and_refuse(in_project, capsys):
    """register -> candidate; promote with no champion; a worse model is refused, and only
    --force promotes it; registering the same run twice gives the same version."""
    from mnist_pipeline.stages import train
    from mnist_pipeline.stages.evaluate import evaluate

    work, _, cfg, metrics, _ = in_project
    loose = ["registry.max_gap=1.0"]  # tiny data: the gap is not what this test is about
    assert registry.main(loose) == 0
    out = capsys.readouterr().out
    assert "registered: run" in out and "version 1 (alias candidate)" in out
    assert registry.main(loose) == 0  # same run again: same version
    assert "version 1 (alias candidate)" in capsys.readouterr().out

    client = tracking.client()
    mv = client.get_model_version_by_alias("mnist", "candidate")
    run_id = json.loads((work / "models" / RUN_FILE).read_text())["run_id"]
    assert mv.run_id == run_id and mv.tags["source_run_id"] == run_id
    assert float(mv.tags["test_accuracy"]) == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert float(mv.tags["accuracy_gap"]) == pytest.approx(metrics["accuracy_gap"], abs=1e-6)
    run = client.get_run(run_id)
    assert mv.tags["data_sha256"] == run.data.tags["data.content_sha256"]
    assert mv.tags["git_commit"] == run.data.tags["git.commit"]
    assert run.info.status == "FINISHED"  # logging the serving model did not reopen it
    # The serving model is the run's, in its experiment (and its artifact folder), not in
    # MLflow's "Default" experiment under ./mlruns.
    serving_model = client.get_logged_model(mv.source.removeprefix("models:/"))
    assert serving_model.experiment_id == run.info.experiment_id
    assert not (work / "mlruns").exists()

    assert registry.main(["--promote", *loose]) == 0
    out = capsys.readouterr().out
    assert "promoted: version 1 is champion: no champion yet" in out
    assert str(client.get_model_version_by_alias("mnist", "champion").version) == "1"

    # A worse model: one epoch, in another folder so the first stays the pipeline's model.
    import dataclasses

    paths = dataclasses.replace(cfg.paths, models="models-worse", reports="reports-worse")
    worse_cfg = dataclasses.replace(
        cfg, paths=paths, train=dataclasses.replace(cfg.train, epochs=1)
    )
    train.train(worse_cfg)
    worse = evaluate(worse_cfg)
    assert worse["test_accuracy"] < metrics["test_accuracy"]
    worse_run = json.loads((work / "models-worse" / RUN_FILE).read_text())["run_id"]
    assert registry.main(["--run-id", worse_run, *loose]) == 0
    assert "version 2 (alias candidate)" in capsys.readouterr().out
    assert registry.main(["--promote", *loose]) == 1
    out = capsys.readouterr().out
    assert "refused: version 2 stays candidate" in out and "does not beat" in out
    assert str(client.get_model_version_by_alias("mnist", "champion").version) == "1"

    assert registry.main(["--promote", "--force", *loose]) == 0
    assert "promoted (forced): version 2" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias("mnist", "champion").version) == "2"
    assert "forced over" in client.get_model_version("mnist", "2").tags["promoted"]
    # Roll back to version 1: it beats the champion, so the rule allows it.
    assert registry.main(["--promote", "--version", "1", *loose]) == 0
    assert str(client.get_model_version_by_alias("mnist", "champion").version) == "1"
    capsys.readouterr()


@pytest.mark.slow
def test_register_errors(in_project, capsys, tmp_path, monkeypatch):
    assert exit_code(registry.main, ["--run-id", "0" * 32]) == 1
    assert "error: no run" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # no models/run.json here
    assert exit_code(registry.main, []) == 1
    assert "run the train stage first" in capsys.readouterr().err
    assert exit_code(registry.main, ["registry.max_gap=-1"]) == 1
    assert "registry.max_gap must be in [0, 1]" in capsys.readouterr().err


def write_pngs(folder: Path, arrays: dict, count: int) -> dict[str, int]:
    """Test images as the files a user has: 3x larger, dark on light, in colour."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for i in range(count):
        ink = 255 - arrays["test_images"][i]
        picture = Image.fromarray(ink).resize((84, 84), Image.Resampling.BICUBIC)
        coloured = Image.merge("RGB", (picture, picture, picture.point(lambda v: v // 2 + 128)))
        path = folder / f"test-{i:03d}.png"
        coloured.save(path)
        expected[str(path)] = int(arrays["test_labels"][i])
    return expected


@pytest.mark.slow
def test_predict_png_files_gets_the_labels(in_project, tmp_path, capsys):
    """PNG files made from test images: `predict` names their digits as the evaluate stage
    did; a file that is not a picture gets an error line, the others still run, exit 1."""
    from mnist_pipeline.serving import predict

    _, _, _, metrics, arrays = in_project
    expected = write_pngs(tmp_path / "pngs", arrays, 30)
    (tmp_path / "pngs" / "readme.txt").write_text("not a picture")
    code = predict.main([str(tmp_path / "pngs"), str(tmp_path / "missing.png")])
    captured = capsys.readouterr()
    assert code == 1
    assert f"error: {tmp_path / 'pngs' / 'readme.txt'}: not an image" in captured.err
    assert f"error: {tmp_path / 'missing.png'}: no such file" in captured.err
    got = {}
    for line in captured.out.splitlines():
        name, digit, probability = line.split(" ")
        got[name] = int(digit)
        assert 0.0 <= float(probability) <= 1.0
    assert set(got) == set(expected)
    right = np.mean([got[k] == v for k, v in expected.items()])
    assert right >= min(0.9, metrics["test_accuracy"] - 0.05), (right, metrics)


@pytest.mark.parametrize(
    ("model", "says"),
    [
        (
            "models:/no-such-model@champion",
            "no registered model 'no-such-model' in the MLflow store",
        ),
        ("models:/mnist@no-such-alias", "registered model 'mnist' has no alias 'no-such-alias'"),
        ("models:/mnist/999", "registered model 'mnist' has no version 999"),
        ("mnist", "expected models:/<name>@<alias> or models:/<name>/<version>"),
    ],
)
def test_serve_says_which_model_is_missing(in_project, capsys, model, says):
    """`make serve` before anything is registered (or with a typo): one line that says how to
    register, before MLflow's server starts."""
    from mnist_pipeline.serving import server as serve

    if "mnist@" in model or "mnist/" in model:
        assert exit_code(registry.main, ["registry.max_gap=1.0"]) == 0  # `mnist` exists
    capsys.readouterr()
    assert exit_code(serve.main, ["--model", model]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_serve_starts_a_worker_per_core_with_one_thread_each(monkeypatch, capsys):
    """`make serve` runs uvicorn with a worker per core, each with one TensorFlow thread
    (unless the environment says otherwise) and the model to load; 0 workers is refused."""
    from mnist_pipeline.serving import app
    from mnist_pipeline.serving import server as serve

    monkeypatch.setattr(serve, "check_registered", lambda model: None)
    monkeypatch.setattr(serve.tracking, "check_store", lambda uri: None)
    monkeypatch.setattr(serve.tracking, "require_existing_store", lambda: None)
    # Set here so that monkeypatch puts back what main() sets for the workers.
    for name in ("TF_NUM_INTRAOP_THREADS", app.MODEL_ENV, "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("TF_NUM_INTEROP_THREADS", "2")
    started = []
    monkeypatch.setattr(
        serve, "run_server", lambda *args: started.append((args, dict(os.environ))) or 0
    )
    assert serve.main([]) == 0
    (((host, port, workers), env),) = started
    assert (host, port, workers) == ("127.0.0.1", 5001, serve.usable_cores())
    assert (env["TF_NUM_INTRAOP_THREADS"], env["TF_NUM_INTEROP_THREADS"]) == ("1", "2")
    assert env[app.MODEL_ENV] == "models:/mnist@champion"
    serve.main(["--workers", "3"])
    assert started[-1][0][-1] == 3
    with pytest.raises(SystemExit):
        serve.main(["--workers", "0"])
    assert "--workers must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_champion_over_http(in_project, tmp_path):
    """run -> register -> promote -> `make serve` -> HTTP: answers match the
    evaluate stage's predictions and `predict --model models:/mnist@champion`; inputs
    outside the contract get 400s with a reason, a body over the size limit a 413."""
    work, uri, _, metrics, arrays = in_project
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        # `mlflow models serve` starts `uvicorn` from PATH: the project's environment's.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    loose = "registry.max_gap=1.0"
    result = run_stage("register", work, env, loose)
    assert result.returncode == 0, result.stderr
    # What it did, and nothing of TensorFlow's or MLflow's start-up (issue 23).
    assert result.stdout.startswith("registered: run ") and result.stderr == "", result.stderr
    result = run_stage("register", work, env, "--promote", loose)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is champion" in result.stdout or "already the champion" in result.stdout

    x_test = np.load(work / "data/processed/x_test.npy") / np.float32(255)  # what it serves
    pngs = tmp_path / "pngs"
    expected = write_pngs(pngs, arrays, 10)
    from_files = np.stack([images.image_to_pixels(p) for p in sorted(expected)])
    with (work / "reports/test_predictions.csv").open() as f:
        evaluated = [int(row["predicted"]) for row in csv.DictReader(f)]
    batch = json.dumps({"inputs": x_test.tolist()})
    # A limit above every good request here; a body over it is refused, never kept.
    env[app.MAX_BYTES_ENV] = str(2 * len(batch))
    server = ScoringServer("models:/mnist@champion", env, tmp_path / "serve.log")
    try:
        too_big = '{"inputs": [' + ",".join([batch[11:-2]] * 3) + "]}"
        for chunked in (False, True):
            status, answer = server.post(too_big.encode(), chunked=chunked)
            assert status == 413, (chunked, answer[:300])
            assert "over the server's limit" in json.loads(answer)["message"]
        # curl's way with a large body: it waits for "100 Continue", which never comes.
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as raw:
            raw.sendall(
                b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(too_big)
            )
            assert raw.recv(65536).startswith(b"HTTP/1.1 413 ")
        status, body = server.post(batch)
        assert status == 200, body
        answers = json.loads(body)["predictions"]
        assert [a["digit"] for a in answers] == evaluated
        labels = arrays["test_labels"]
        served_accuracy = np.mean([a["digit"] == y for a, y in zip(answers, labels, strict=True)])
        assert served_accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-6)
        for a in answers:
            assert a["probability"] == pytest.approx(max(a["probabilities"]))
            assert sum(a["probabilities"]) == pytest.approx(1.0, abs=1e-4)
        status, body = server.post(json.dumps({"instances": from_files.tolist()}))
        assert status == 200, body
        served_files = [a["digit"] for a in json.loads(body)["predictions"]]

        bad = {
            "0-255 pixels": ({"inputs": (x_test[:1] * 255).tolist()}, "divide them by 255"),
            "28x28": ({"inputs": x_test[:1].reshape(1, 28, 28).tolist()}, "(-1, 784)"),
            "783 values": ({"inputs": x_test[:1, :783].tolist()}, "(-1, 784)"),
            "strings": ({"inputs": [["white"] * 784]}, "could not convert"),
            "NaN": ('{"inputs": [[NaN' + ", 0" * 783 + "]]}", "not valid JSON"),
            "negative": ({"inputs": (x_test[:1] - 1).tolist()}, "must be in [0, 1]"),
            "no data": ({"pixels": [0] * 784}, "instances"),
            "ragged": ({"inputs": [[0.5] * 784, [0.5] * 3]}, "equal-length rows"),
            "not JSON": ("inputs=0.5", "not valid JSON"),
        }
        for what, (payload, says) in bad.items():
            body = payload if isinstance(payload, str) else json.dumps(payload)
            status, answer = server.post(body)
            assert status == 400, (what, status, answer[:500])
            assert says in json.loads(answer)["message"], (what, answer[-800:])
        # `kill` while clients keep sending: every request gets its whole answer or a closed
        # connection, never an error status or half a body; the server shuts down gracefully,
        # its last lines written, and exits 0.
        outcomes, code = terminated_under_load(server, json.dumps({"inputs": x_test[:8].tolist()}))
        assert code == 0 and outcomes["200"] > 0, (code, outcomes)
        assert set(outcomes) <= {"200", "connection closed"}, outcomes
        assert "Application shutdown complete" in server.log.read_text()
    finally:
        server.close()
    # What `make serve` printed: its command line and the server's own lines, none of
    # TensorFlow's start-up in the worker (oneDNN, absl, CUDA probing).
    log = (tmp_path / "serve.log").read_text()
    assert "serving models:/mnist@champion from " in log, log[-2000:]
    assert "Uvicorn running" in log, log[-2000:]
    for noise in ("oneDNN", "absl::InitializeLog", "cudart_stub"):
        assert noise not in log, (noise, log[-2000:])

    # The same files through `predict` (a real CLI run) on the same model: the same digits.
    result = run_stage("predict", work, env, "--model", "models:/mnist@champion", str(pngs))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert [name for name, _, _ in lines] == sorted(expected)
    assert [int(digit) for _, digit, _ in lines] == served_files


@pytest.mark.slow
def test_the_served_model_loads_where_only_mlflow_and_tensorflow_are(in_project, tmp_path):
    """A service that has only `mlflow` and `tensorflow` installed loads the champion with
    `mlflow.pyfunc.load_model` and gets the contract's answer: the served model needs nothing
    of this project (neither its package nor Hydra, DVC, Optuna ...)."""
    work, uri = in_project[0], in_project[1]
    assert exit_code(registry.main, ["registry.max_gap=1.0"]) == 0
    assert exit_code(registry.main, ["--promote", "registry.max_gap=1.0"]) == 0
    script = """
import json, numpy as np, mlflow
for absent in ("mnist_pipeline", "hydra", "dvc", "optuna"):
    try:
        __import__(absent)
    except ModuleNotFoundError:
        continue
    raise SystemExit(f"{absent} importable: not a clean environment")
model = mlflow.pyfunc.load_model("models:/mnist@champion")
x = np.load("x_test.npy")[:3]
print(json.dumps(model.predict(x)["digit"].tolist()))
"""
    np.save(tmp_path / "x_test.npy", np.load(work / "data/processed/x_test.npy") / np.float32(255))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    done = run_with_only(["mlflow", "tensorflow"], script, tmp_path, env)
    assert done.returncode == 0, done.stderr[-3000:]
    with (work / "reports/test_predictions.csv").open() as f:
        evaluated = [int(row["predicted"]) for row in csv.DictReader(f)][:3]
    assert json.loads(done.stdout.splitlines()[-1]) == evaluated


@pytest.fixture
def sweep_job(tracking_store):
    """Make a finished training run of a sweep, with the given metrics and extra tags, in a
    fresh store; returns its run id (what register's sweep selection picks among)."""
    from mlflow import MlflowClient

    from mnist_pipeline import tracking

    client = MlflowClient()
    experiment = tracking.ensure_experiment("mnist")

    def make(
        sweep: str, metrics: dict[str, float], tags: dict | None = None, status: str = "FINISHED"
    ) -> str:
        run = client.create_run(
            experiment, tags={"stage": "train", "sweep_id": sweep, **(tags or {})}
        )
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id, status=status)
        return run.info.run_id

    make.client, make.experiment = client, experiment
    return make


def test_best_of_sweep_picks_the_best_evaluated_job(sweep_job):
    """A plain sweep (no validation split) registers its job with the highest test accuracy
    (ties: the smaller gap); unfinished jobs and other sweeps' jobs are not candidates."""

    def job(sweep: str, accuracy: float, gap: float, status: str = "FINISHED") -> str:
        return sweep_job(sweep, {"test_accuracy": accuracy, "accuracy_gap": gap}, status=status)

    job("s1", 0.95, 0.01)
    tie_bigger_gap = job("s1", 0.97, 0.03)
    best = job("s1", 0.97, 0.02)
    job("s1", 0.99, 0.0, status="FAILED")
    job("s2", 0.995, 0.0)
    assert registry.best_sweep_run("s1") == best != tie_bigger_gap


def test_best_of_sweep_without_a_sweep_says_how_to_run_one(tracking_store, capsys):
    """Before any sweep, `register --best-of-sweep` is one line that names the command to
    run (not an option register does not have)."""
    assert exit_code(registry.main, ["--best-of-sweep"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: no sweep found in the store")
    assert "python -m mnist_pipeline.pipeline -m" in err and "--experiment" not in err


def test_best_of_a_search_is_judged_on_validation_not_test(sweep_job):
    """An Optuna study's best job is its best objective (validation), in the study's
    direction, even where another trial scored higher on the test set; a sweep whose jobs
    held out a validation split is judged by val_accuracy."""

    def job(sweep: str, metrics: dict[str, float], tags: dict[str, str] | None = None) -> str:
        return sweep_job(sweep, {"accuracy_gap": 0.01, **metrics}, tags)

    up = {"optuna_direction": "maximize"}
    job("study", {"objective": 0.96, "test_accuracy": 0.99}, up)
    best = job("study", {"objective": 0.98, "test_accuracy": 0.97}, up)
    assert registry.best_sweep_run("study") == best

    down = {"optuna_direction": "minimize"}
    job("loss-study", {"objective": 0.30, "test_accuracy": 0.99}, down)
    lowest = job("loss-study", {"objective": 0.10, "test_accuracy": 0.95}, down)
    assert registry.best_sweep_run("loss-study") == lowest

    job("grid", {"val_accuracy": 0.95, "test_accuracy": 0.99})
    best_val = job("grid", {"val_accuracy": 0.97, "test_accuracy": 0.96})
    assert registry.best_sweep_run("grid") == best_val

    # One job without the metric (a trial told FAIL, a job with no split) does not turn the
    # choice into one made on the test set: it is ranked after the others.
    job(
        "mixed-study", {"test_accuracy": 0.999}, {**up, "optuna_study": "s", "optuna_state": "FAIL"}
    )
    judged = job("mixed-study", {"objective": 0.95, "test_accuracy": 0.96}, up)
    assert registry.best_sweep_run("mixed-study") == judged
    job("mixed-grid", {"test_accuracy": 0.999})
    with_split = job("mixed-grid", {"val_accuracy": 0.95, "test_accuracy": 0.96})
    assert registry.best_sweep_run("mixed-grid") == with_split


def test_a_study_registers_the_trial_it_reports_as_best(sweep_job):
    """Tied objectives (common at 1/6000 steps): the trial Optuna reports as best (the
    parent run's best_run_id, what its best.* tags describe) is the one registered, even
    where another tied trial has a smaller gap."""
    client = sweep_job.client
    parent = client.create_run(sweep_job.experiment, tags={"sweep_role": "parent"}).info.run_id

    def trial(gap: float) -> str:
        tags = {"mlflow.parentRunId": parent, "optuna_study": "s", "optuna_direction": "maximize"}
        metrics = {"objective": 0.9782, "test_accuracy": 0.98, "accuracy_gap": gap}
        return sweep_job("tied", metrics, tags)

    reported = trial(gap=0.02)
    smaller_gap = trial(gap=0.01)
    client.set_tag(parent, "best_run_id", reported)
    assert registry.best_sweep_run("tied") == reported != smaller_gap
    client.set_tag(parent, "best_run_id", "unknown")  # no report: the smaller gap
    assert registry.best_sweep_run("tied") == smaller_gap


def test_predict_never_creates_a_store(tmp_path, capsys, monkeypatch):
    """A registry URI against a SQLite store that does not exist (a typo in
    MLFLOW_TRACKING_URI, a fresh clone) is one line, and no empty store appears."""
    from mnist_pipeline.serving import predict

    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nowhere" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing}")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "a.png")
    assert exit_code(predict.main, ["--model", "models:/mnist@champion", "a.png"]) == 1
    assert f"error: no MLflow store at {missing}" in capsys.readouterr().err
    assert not missing.exists() and not missing.parent.exists()


def test_predict_with_no_picture_to_read_says_so_before_loading_a_model(
    tmp_path, capsys, monkeypatch
):
    """Only missing paths: their lines at once, without the seconds of loading the model (a
    model that does not exist is not even looked for)."""
    from mnist_pipeline.serving import predict

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    assert exit_code(predict.main, ["--model", "no-such.keras", "digits/", "empty"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: digits/: no such file", "error: empty: folder has no files"], err


def test_predict_says_which_model_is_missing(tmp_path, capsys, monkeypatch, tracking_store):
    from mnist_pipeline.serving import predict

    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "a.png")
    assert exit_code(predict.main, ["a.png"]) == 1
    assert "models/model.keras not found: run the train stage first" in capsys.readouterr().err
    from mnist_pipeline import tracking

    tracking.ensure_experiment("mnist")  # a store that exists, with nothing registered
    assert exit_code(predict.main, ["--model", "models:/mnist@champion", "a.png"]) == 1
    # (MLflow's own INFO lines show in process; the CLI silences them: see docs/serving.md)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: cannot load model models:/mnist@champion from sqlite:")
    assert "Registered Model with name=mnist not found" in last
