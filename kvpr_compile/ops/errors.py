"""The refusal raised by every analysis that decides a graph (or a site of it) cannot be
rewritten or scheduled: the backend catches it and keeps the plain path, with its message."""
from __future__ import annotations


class Unsupported(Exception):
    """This site cannot be rewritten; the message is the reason shown to the user."""
