"""``python -m mnist_pipeline.tracking_server``: see ``mnist_pipeline.tracking.server``."""

from mnist_pipeline.tracking.server import main

if __name__ == "__main__":
    main()
