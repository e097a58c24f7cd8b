"""What training a network needs in memory, counted from the config: a network that cannot fit
is refused before anything is allocated (an OOM kill mid-run loses the run and says nothing).
Nothing here imports TensorFlow: the check runs before it is loaded."""

from __future__ import annotations

from mnist_pipeline.core import memory
from mnist_pipeline.core.config import PipelineConfig
from mnist_pipeline.core.diagnosis import MEMORY_HINT
from mnist_pipeline.core.errors import PipelineError
from mnist_pipeline.stages.artifacts import INPUT_DIM, NUM_CLASSES

FLOAT_BYTES = 4
#: The optimizer's own copies of every parameter (at least: momentum adds one more to SGD
#: and RMSprop), besides the weights and their gradients.
OPTIMIZER_SLOTS = {"sgd": 0, "rmsprop": 1, "adam": 2}


def parameter_count(units: int, layers: int) -> int:
    """The network's weights and biases (``model.build_model``'s layers)."""
    dense = INPUT_DIM * units + units + (layers - 1) * (units * units + units)
    return dense + units * NUM_CLASSES + NUM_CLASSES


def training_bytes(cfg: PipelineConfig, n_train: int) -> tuple[int, str]:
    """A lower bound on what training this network allocates, and how it was counted."""
    params = parameter_count(cfg.model.units, cfg.model.layers)
    copies = 2 + OPTIMIZER_SLOTS.get(cfg.optimizer.name, 0)
    batch = min(cfg.train.batch_size, max(n_train, 1))
    # forward activations and their gradients, per image in a batch
    activations = 2 * batch * (INPUT_DIM + cfg.model.layers * cfg.model.units + NUM_CLASSES)
    data = n_train * (INPUT_DIM + NUM_CLASSES)  # the training set as float tensors
    total = FLOAT_BYTES * (params * copies + activations + data)
    how = (
        f"{params:,} parameters x {copies} copies (weights, gradients, optimizer state) "
        f"x 4 bytes, plus a {batch}-image batch and the data"
    )
    return total, how


def check_memory(cfg: PipelineConfig, n_train: int) -> None:
    """Refuse, before anything is allocated, a network that cannot fit in memory."""
    need, how = training_bytes(cfg, n_train)
    available = memory.available_bytes()
    if available is not None and need > available[0]:
        raise PipelineError(
            f"out of memory before starting: training needs at least {memory.gib(need)} ({how}) "
            f"but {memory.gib(max(available[0], 0))} is {available[1]}; {MEMORY_HINT}"
        )
