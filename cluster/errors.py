"""The errors cluster/ raises: each message is one line for the user.

cluster/ knows nothing of the run that uses it, so these say what happened to the
devices; the caller adds what it keeps and how to go on.
"""
from __future__ import annotations

from tasks.errors import UserError



class ClusterError(UserError, RuntimeError):
    """Ray or the device workers cannot go on."""


class WorkerStartError(ClusterError):
    """A device worker failed to start: all of the command's workers are stopped."""


class WorkerBroken(ClusterError):
    """A worker cannot run any more shards (one of its host processes died): a device fault, not a shard's."""


class AllDevicesLost(ClusterError):
    """No worker is left while shards remain."""


class Stopped(ClusterError):
    """The caller asked the dispatch to stop (Ctrl-C); finished shards were all handed over."""


def first_line(error: BaseException) -> str:
    """The one line of a Ray error that a user needs."""
    from ray.exceptions import RayActorError, RayTaskError

    # A task error carries the actor's own exception; its last line is the one the user needs.
    text = str(error.cause if isinstance(error, RayTaskError) and error.cause else error)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(error).__name__
    # A dead actor's last line runs on with troubleshooting advice: its first sentence says it.
    line = lines[-1].split(". ")[0].rstrip(".") if isinstance(error, RayActorError) else lines[-1]
    # A worker's own error arrives as 'package.module.SomeClass: message' (an actor's creation error
    # carries no cause, only this text): the message is the line.
    head, sep, rest = line.partition(": ")
    return rest if sep and "." in head and head.replace(".", "").replace("_", "").isalnum() \
        and head.rsplit(".", 1)[1][:1].isupper() else line
