"""ticrypt-rest: the backend REST entry point.

Layers: :mod:`~ticrypt.rest.config` (schema of ``rest.ini``),
:mod:`~ticrypt.rest.db` (SQLite file, versioned migrations, one writer
thread), :mod:`~ticrypt.rest.store` (synchronous queries shared with
``ticrypt-admin``), :mod:`~ticrypt.rest.core` (sans-IO challenge table, token
hashing, field checks), :mod:`~ticrypt.rest.api` (the operations and their
routes), :mod:`~ticrypt.rest.web` (the routes served on the bounded JSON
site of :mod:`ticrypt.http.server`) and :mod:`~ticrypt.rest.tap` (twistd
wiring).
"""
