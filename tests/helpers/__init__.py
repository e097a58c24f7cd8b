"""Test support: tiny MNIST-format data, composed configs, stage processes, project copies,
real servers. Fixtures live in ``tests/conftest.py``; everything else a test imports is here."""
