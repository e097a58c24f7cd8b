"""``python -m mnist_pipeline.ui``: see ``mnist_pipeline.experiments.ui``."""

import sys

from mnist_pipeline.experiments.ui import main

if __name__ == "__main__":
    sys.exit(main())
