"""The four DVC stages (download, preprocess, train, evaluate), the files that pass between
them (``artifacts``) and what they need to do their work: the model, the training callbacks,
the figures, MNIST's file format, distribution strategies, and the in-process runner.
"""
