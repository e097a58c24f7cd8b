"""``python -m mnist_pipeline.register``: see ``mnist_pipeline.serving.registry``."""

from mnist_pipeline.core.shutdown import exit_fast
from mnist_pipeline.serving.registry import main

if __name__ == "__main__":
    exit_fast(main())  # main returned: its work is done (a failure raised SystemExit)
