"""``python -m mnist_pipeline.check``: see ``mnist_pipeline.stages.check``."""

import sys

from mnist_pipeline.stages.check import main

if __name__ == "__main__":
    sys.exit(main())
