"""The errors of a run that the command line prints as one line (exit 2; Interrupted: 130)."""
from __future__ import annotations

from tasks.errors import UserError



class RunError(UserError, RuntimeError):
    """The run cannot go on; one line for the user."""


class Interrupted(RunError):
    pass
