"""MNIST pipeline: DVC stages, Hydra config and MLflow tracking around the Keras example."""

import gc
import os

# TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) buries the training log; errors
# stay. Set here, before any module of the package can import TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: The libraries' own calls home, off in every process of the project and the processes it
#: starts (a stage, `make ui`'s `mlflow ui`, a sweep's Ray workers): a pipeline run connects
#: to nothing its user did not configure (the tracking store, the mirrors, the DVC remote),
#: and the tests and benchmarks stay on loopback. MLflow 3.2 and later send usage telemetry
#: from every process that logs (config.mlflow-telemetry.io, checked with 3.17.2) and from
#: the UI through its server; Ray sends usage stats from every cluster it starts. DVC's
#: update check is off in .dvc/config. A variable set beforehand is kept: opt in that way.
CALLS_HOME_OFF = {"MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0"}

#: MLflow's GenAI job runner, off in the servers the project starts (`make ui`, `make server`,
#: the cluster's tracking host): the project runs none of its jobs, and each server start
#: (MLflow 3.17.2) makes a Huey consumer and a folder in /dev/shm that it never removes.
MLFLOW_JOBS_OFF = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
for _name, _value in {**CALLS_HOME_OFF, **MLFLOW_JOBS_OFF}.items():
    os.environ.setdefault(_name, _value)

#: Python's cyclic garbage collector, run less often in every process of the project. With
#: CPython 3.11's thresholds (700, 10, 10) it ran about 1,050 times while TensorFlow and
#: MLflow imported (seven of them full passes over up to half a million objects) and freed
#: almost nothing: nearly everything an import creates lives as long as the process. That
#: was 11-22 % of those imports, paid once or twice by every stage of every `dvc repro`
#: (measured in .venv: `import mlflow` 1.40 s -> 1.24 s, `import tensorflow` 1.84 s -> 1.43
#: s). Every 50,000 new objects instead: 22 collections, garbage still collected, a few MB
#: later at most. A higher threshold set beforehand, or a collector turned off, is kept.
GC_THRESHOLD = 50_000
if gc.get_threshold()[0] < GC_THRESHOLD:
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
