"""Typed errors. Every user-facing failure is a `BastionError` whose message says what is wrong
and what to do; the CLI prints it on one line without a traceback."""


class BastionError(Exception):
    """Base class of all errors Bastion raises for bad input or bad state."""


class DataError(BastionError):
    """A data set is unknown, missing, malformed, or images are outside [0, 1] / not finite."""


class ModelError(BastionError):
    """An unknown architecture or bad model arguments."""


class CheckpointError(BastionError):
    """A checkpoint is missing, corrupt, untrusted (pickle) or does not match its card."""


class ThreatModelError(BastionError):
    """A threat-model string cannot be parsed or has invalid values."""


class ThreatModelViolation(BastionError):
    """An adversarial batch left the threat model (norm above eps, outside [0, 1], NaN/inf)."""


class ConfigError(BastionError):
    """A run configuration has an unknown key, a wrong type or a bad value."""


class RunError(BastionError):
    """A run directory is inconsistent (e.g. resumed with a different config)."""
