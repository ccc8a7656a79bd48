"""Hyper-parameter sweeps of GLARE with Ray Tune + Optuna (``python tune/sweep.py``)."""
