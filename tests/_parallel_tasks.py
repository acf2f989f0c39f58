"""Picklable task functions for tests/test_parallel.py (spawned workers import this module)."""

from __future__ import annotations

import os
from pathlib import Path


def square(task):
    return task * task


def flaky(task):
    """Fails the first time it sees each task (a marker file records the first attempt); then returns
    (value, torch threads of the worker that ran it)."""
    import torch

    value, marker_dir = task
    marker = Path(marker_dir) / f"seen-{value}"
    if not marker.exists():
        marker.write_text("1")
        if value % 2:
            raise RuntimeError(f"transient failure on {value}")
        os._exit(3)  # kill the worker process outright
    return value, torch.get_num_threads()


def always_fails(task):
    raise ValueError("permanent failure")


def crash(task):
    os._exit(5)
