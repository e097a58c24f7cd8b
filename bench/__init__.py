"""`make bench`: the pipeline against the book's plain script (``python -m bench.run``)."""
