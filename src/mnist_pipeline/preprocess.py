"""``python -m mnist_pipeline.preprocess``: see ``mnist_pipeline.stages.preprocess``."""

from mnist_pipeline.core.shutdown import exit_fast
from mnist_pipeline.stages.preprocess import main

if __name__ == "__main__":
    main()
    exit_fast()  # only after success: a failure exits through Hydra and Python as usual
