"""The ticrypt frontend: the ``ticrypt`` CLI, its config and the REST client."""

from ticrypt import leanimport

leanimport.install()
