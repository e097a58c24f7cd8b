"""The project's own tools: `make lint`'s checks, and the copy of the project that the tests
and the benchmark run DVC in."""
