"""Versions, in a module of their own so every layer can read them without importing the package's facade."""

__version__ = "0.1.0"

# Bumped whenever a change alters what an output looks like for the same inputs and options: it is part of
# every job's key, so finished rows from an older algorithm are redone rather than silently kept.
ALGORITHM_VERSION = "4"
