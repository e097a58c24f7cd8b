"""MNIST pipeline: DVC stages, Hydra config and MLflow tracking around the Keras example."""

import os

# TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) buries the training log; errors
# stay. Set here, before any module of the package can import TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
