"""ticrypt-rest: the backend REST entry point.

Layers: :mod:`~ticrypt.rest.config` (schema of ``rest.ini``),
:mod:`~ticrypt.rest.db` (SQLite file, versioned migrations, one writer
thread), :mod:`~ticrypt.rest.store` (synchronous queries shared with
``ticrypt-admin``), :mod:`~ticrypt.rest.core` (sans-IO challenge table, token
hashing, body validation), :mod:`~ticrypt.rest.api` (the
operations), :mod:`~ticrypt.rest.web` (twisted.web plumbing: bounded bodies,
routing, JSON errors) and :mod:`~ticrypt.rest.tap` (twistd wiring).
"""
