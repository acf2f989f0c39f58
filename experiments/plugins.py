"""Import every module that registers objectives, attacks or report renderers.

The CLI imports this once; library users import the modules they need directly."""
# ruff: noqa: F401
