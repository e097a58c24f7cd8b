"""Comparing runs: Hydra sweeps tracked as parent and child runs, the Optuna search, the
comparison table, the saved view of MLflow's UI, and reproducing a recorded run.
"""
