"""The base every other package stands on: the config schema and params.yaml, errors and
the faults they describe, atomic file writes, where the project is, quiet logs, memory.
Imports nothing else of the project.
"""
