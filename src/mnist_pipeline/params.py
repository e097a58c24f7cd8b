"""``python -m mnist_pipeline.params``: see ``mnist_pipeline.core.params``."""

import sys

from mnist_pipeline.core.params import main

if __name__ == "__main__":
    sys.exit(main())
