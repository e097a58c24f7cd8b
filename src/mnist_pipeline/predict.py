"""``python -m mnist_pipeline.predict``: see ``mnist_pipeline.serving.predict``."""

import sys

from mnist_pipeline.serving.predict import main

if __name__ == "__main__":
    sys.exit(main())
