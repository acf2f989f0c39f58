"""Plugin discovery: packages above ``bastion`` register folds and report renderers on import.

The modules to import are named in the ``bastion.plugins`` entry-point group (pyproject.toml),
so ``bastion`` finds them without importing any package above it by name. `load_plugins` imports
them once; a plugin that cannot be imported here (a missing optional dependency) is skipped.
"""

from __future__ import annotations

GROUP = "bastion.plugins"
_LOADED: set[str] = set()


def load_plugins(group: str = GROUP) -> None:
    """Import every module of the entry-point ``group`` (once per process)."""
    if group in _LOADED:
        return
    _LOADED.add(group)
    from importlib.metadata import entry_points

    for ep in entry_points(group=group):
        try:
            ep.load()
        except ImportError:
            continue
