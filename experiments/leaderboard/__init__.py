"""Robustness leaderboards: entries x threat models through the common evaluator, RobustBench-format
JSON per entry and a static site (see `experiments.leaderboard.run`)."""

from experiments.leaderboard.config import Entry, LeaderboardConfig, parse_config, read_config
from experiments.leaderboard.defenses import list_defenses, register_defense
from experiments.leaderboard.robustbench import read_published, validate_entry
from experiments.leaderboard.run import Execution, run_leaderboard

__all__ = ["Entry", "Execution", "LeaderboardConfig", "list_defenses", "parse_config", "read_config",
           "read_published", "register_defense", "run_leaderboard", "validate_entry"]
