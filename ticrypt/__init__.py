"""ticrypt: secure VM networking on Twisted."""

__version__ = "0.1.0"
