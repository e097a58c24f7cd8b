"""``python -m mnist_pipeline.compare``: see ``mnist_pipeline.experiments.compare``."""

from mnist_pipeline.core.shutdown import exit_fast
from mnist_pipeline.experiments.compare import main

if __name__ == "__main__":
    exit_fast(main())  # main returned: its work is done (a failure raised SystemExit)
