"""The version of tasprune."""

__version__ = "0.1.0"
