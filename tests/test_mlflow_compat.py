"""The MLflow bugs ``tracking.mlflow_compat`` works around are still there, and the workarounds
work. Each test runs MLflow's own code first: once upstream fixes a bug, its test fails, and
the workaround (with its test) can be deleted."""

from __future__ import annotations

import numpy as np
import pytest

from mnist_pipeline.tracking import address, mlflow_compat

pytestmark = pytest.mark.skipif(
    not mlflow_compat.affected(), reason="an MLflow newer than the workarounds were checked on"
)


def test_sqlite_parent_folder_is_made_from_the_escaped_text(tmp_path):
    """Introduced by mlflow/mlflow#19205: the folder is made from the URI before decoding."""
    import mlflow.store.db.utils as db_utils

    mlflow_compat.apply()
    ours = db_utils._make_parent_dirs_if_sqlite
    theirs = ours.__wrapped__
    uri = address.sqlite_uri(tmp_path / "50%" / "mlflow.db")
    theirs(uri)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["50%25"]  # the stray folder
    ours(uri)
    assert (tmp_path / "50%").is_dir()  # the one SQLAlchemy opens


def test_the_ui_server_gets_an_escaped_store_relative_to_its_folder(tmp_path):
    """The same bug in ``mlflow server``'s own processes (``make ui``): a store whose path
    needed escaping is handed over as ``sqlite:///<name>`` with the server started in its
    folder; a plain one as it is."""
    store = tmp_path / "why?" / "mlflow.db"
    assert mlflow_compat.server_store(address.sqlite_uri(store)) == (
        "sqlite:///mlflow.db",
        store.parent,
    )
    plain = address.sqlite_uri(tmp_path / "mlflow.db")
    assert mlflow_compat.server_store(plain) == (plain, None)
    assert mlflow_compat.server_store("http://127.0.0.1:5000") == ("http://127.0.0.1:5000", None)


def test_keras_flavor_input_example_needs_the_folder_first(tmp_path):
    """mlflow/mlflow#16183: ``input_example`` is written before the model folder exists."""
    import keras
    import mlflow.keras

    model = keras.Sequential([keras.Input(shape=(4,)), keras.layers.Dense(2)])
    example = np.zeros((1, 4), dtype="float32")
    with pytest.raises(FileNotFoundError):
        mlflow.keras.save_model(model, str(tmp_path / "theirs"), input_example=example)
    with mlflow_compat.keras_example_dir():
        mlflow.keras.save_model(model, str(tmp_path / "ours"), input_example=example)
    assert (tmp_path / "ours" / "MLmodel").is_file()


def test_schema_inference_imports_scipy():
    """The class of mlflow/mlflow#5839: ``_infer_schema`` imports SciPy for any array, and
    .venv has no SciPy; ``tensor_schema`` gives the same schema without it."""
    from mlflow.types.utils import _infer_schema

    array = np.zeros((3, 784), dtype="float32")
    try:
        import scipy  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(ModuleNotFoundError, match="scipy"):
            _infer_schema(array)
    else:
        assert _infer_schema(array) == mlflow_compat.tensor_schema(array)
    assert mlflow_compat.tensor_schema(array).inputs[0].shape == (-1, 784)


def test_an_mlflow_newer_than_checked_turns_the_workarounds_off(monkeypatch):
    """Each workaround applies only to the versions it was checked against."""
    import mlflow.store.db.utils as db_utils

    monkeypatch.setattr(mlflow_compat, "LAST_CHECKED", (0, 0, 0))
    assert not mlflow_compat.affected()
    before = db_utils._make_parent_dirs_if_sqlite
    monkeypatch.setattr(
        db_utils, "_make_parent_dirs_if_sqlite", getattr(before, "__wrapped__", before)
    )
    mlflow_compat.apply()
    assert not hasattr(db_utils._make_parent_dirs_if_sqlite, "__wrapped__")
    import mlflow.keras.save as keras_save

    original = keras_save._save_example
    with mlflow_compat.keras_example_dir():
        assert keras_save._save_example is original


def test_the_version_is_read_from_either_distribution(monkeypatch):
    from importlib.metadata import PackageNotFoundError

    def version(name):
        if name == "mlflow-skinny":
            raise PackageNotFoundError(name)
        return "3.17.2"

    monkeypatch.setattr(mlflow_compat, "version", version)
    assert mlflow_compat.affected()


def test_model_log_for_a_run_goes_to_the_default_experiment(tracking_store, tmp_path):
    """mlflow/mlflow#15491's fallback never reached: ``Model.log(run_id=...)`` with no active
    run makes the model in experiment 0, not the run's; ``in_experiment_of`` puts it in the
    run's."""
    import mlflow
    from mlflow.models import Model

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    client = mlflow.MlflowClient()
    experiment = client.create_experiment("elsewhere", artifact_location=str(tmp_path / "a"))
    run = client.create_run(experiment)

    def logged_in() -> str:
        info = Model.log(
            artifact_path=None, name="m", flavor=mlflow.pyfunc, run_id=run.info.run_id,
            python_model=Echo(),
        )  # fmt: skip
        return client.get_logged_model(info.model_id).experiment_id

    assert logged_in() == "0"
    with mlflow_compat.in_experiment_of(run):
        assert logged_in() == experiment
