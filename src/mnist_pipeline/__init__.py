"""MNIST pipeline."""
