"""``python -m mnist_pipeline.preprocess``: see ``mnist_pipeline.stages.preprocess``."""

from mnist_pipeline.stages.preprocess import main

if __name__ == "__main__":
    main()
