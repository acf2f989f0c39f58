"""Bastion: the foundation package (data, models, threat models, checkpoints, training loop,
run records, the common evaluator, metrics and reports). Imports nothing else of the project."""

from bastion.errors import BastionError

__version__ = "0.1.0"
__all__ = ["BastionError", "__version__"]
