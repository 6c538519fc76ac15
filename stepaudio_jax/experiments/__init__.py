"""Experiments over runs: sweeps of config variants and reports comparing their runs."""
