"""``python -m mnist_pipeline.compare``: see ``mnist_pipeline.experiments.compare``."""

import sys

from mnist_pipeline.experiments.compare import main

if __name__ == "__main__":
    sys.exit(main())
