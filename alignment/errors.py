"""Errors a user can act on, below every module that raises them (it imports nothing of the project's).

The command line prints each as one `error: ...` line and exits with status 2 (`alignment.cli`).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A recipe value is invalid; the message names the key and what is allowed."""
