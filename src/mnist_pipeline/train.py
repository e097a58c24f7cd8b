"""``python -m mnist_pipeline.train``: see ``mnist_pipeline.stages.train``."""

from mnist_pipeline.stages.train import main

if __name__ == "__main__":
    main()
