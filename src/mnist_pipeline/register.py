"""``python -m mnist_pipeline.register``: see ``mnist_pipeline.serving.registry``."""

import sys

from mnist_pipeline.serving.registry import main

if __name__ == "__main__":
    sys.exit(main())
