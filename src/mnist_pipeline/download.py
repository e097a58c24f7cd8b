"""``python -m mnist_pipeline.download``: see ``mnist_pipeline.stages.download``."""

from mnist_pipeline.stages.download import main

if __name__ == "__main__":
    main()
