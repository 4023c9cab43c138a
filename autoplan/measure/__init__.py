"""Measuring a machine and a model: calibration of a cluster, per-layer profile files."""
