"""Benchmarks of zenml-workers against raw Celery, raw boto3 and published ZenML figures.

Run with ``make bench`` (``python -m bench``); see :mod:`bench.__main__` for options.
Importing this package starts nothing.
"""
