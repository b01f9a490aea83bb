"""ticrypt-admin: bootstrap and administer the rest database from the backend host."""
