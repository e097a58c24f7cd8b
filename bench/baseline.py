"""The book's MNIST script, plain: the baseline the pipeline is measured against.

Deliberately standalone (no project code): the four gzipped IDX files from a folder, the
network Dense(512, relu) -> Dense(10, softmax), RMSprop, 5 epochs, batch 128. Prints one
JSON line with its timings and accuracies.

    python bench/baseline.py /path/to/mnist
"""

import gzip
import json
import sys
import time

start = time.perf_counter()

import numpy as np  # noqa: E402
from tensorflow import keras  # noqa: E402


def load(folder: str, name: str, offset: int) -> np.ndarray:
    with gzip.open(f"{folder}/{name}", "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


folder = sys.argv[1]
train_images = load(folder, "train-images-idx3-ubyte.gz", 16).reshape(-1, 28 * 28)
train_labels = load(folder, "train-labels-idx1-ubyte.gz", 8)
test_images = load(folder, "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28 * 28)
test_labels = load(folder, "t10k-labels-idx1-ubyte.gz", 8)

train_images = train_images.astype("float32") / 255
test_images = test_images.astype("float32") / 255
train_labels = keras.utils.to_categorical(train_labels)
test_labels = keras.utils.to_categorical(test_labels)

network = keras.Sequential(
    [
        keras.Input(shape=(28 * 28,)),
        keras.layers.Dense(512, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ]
)
network.compile(optimizer="rmsprop", loss="categorical_crossentropy", metrics=["accuracy"])

fit_start = time.perf_counter()
history = network.fit(train_images, train_labels, epochs=5, batch_size=128, verbose=2)
fit_seconds = time.perf_counter() - fit_start

test_loss, test_acc = network.evaluate(test_images, test_labels, verbose=0)
print(
    json.dumps(
        {
            "fit_seconds": fit_seconds,
            "fit_accuracy": history.history["accuracy"][-1],
            "test_accuracy": test_acc,
            "script_seconds": time.perf_counter() - start,
        }
    )
)
