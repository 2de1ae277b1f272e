"""The one base of the errors a user can fix.

An error of this kind says, in one line, which file, field or flag is wrong and how to
fix it; ``python -m runner`` prints it as ``error: ...`` and exits with status 2, with no
traceback. Any other exception is the project's own bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message is one line that says what and how."""
