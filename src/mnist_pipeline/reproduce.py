"""``python -m mnist_pipeline.reproduce``: see ``mnist_pipeline.experiments.reproduce``."""

import sys

from mnist_pipeline.experiments.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
