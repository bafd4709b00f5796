"""Mutation check of the project's own tests: named breakages of the rewrite and the runtime
(``catalog.py``), each applied alone to a scratch copy of the repository and run against the
tests that must catch it (``python -m tests.mutations``; see ``__main__.py``).

Not part of the default pytest run: nothing here is named ``test_*``."""
