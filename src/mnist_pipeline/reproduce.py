"""``python -m mnist_pipeline.reproduce``: see ``mnist_pipeline.experiments.reproduce``."""

from mnist_pipeline.core.shutdown import exit_fast
from mnist_pipeline.experiments.reproduce import main

if __name__ == "__main__":
    exit_fast(main())  # main returned: its work is done (a failure raised SystemExit)
