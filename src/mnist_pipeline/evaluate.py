"""``python -m mnist_pipeline.evaluate``: see ``mnist_pipeline.stages.evaluate``."""

from mnist_pipeline.core.shutdown import exit_fast
from mnist_pipeline.stages.evaluate import main

if __name__ == "__main__":
    main()
    exit_fast()  # only after success: a failure exits through Hydra and Python as usual
