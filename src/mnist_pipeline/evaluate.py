"""``python -m mnist_pipeline.evaluate``: see ``mnist_pipeline.stages.evaluate``."""

from mnist_pipeline.stages.evaluate import main

if __name__ == "__main__":
    main()
