"""``python -m mnist_pipeline.serve``: see ``mnist_pipeline.serving.server``."""

import sys

from mnist_pipeline.serving.server import main

if __name__ == "__main__":
    sys.exit(main())
