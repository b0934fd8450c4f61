"""The error of an export's input, shared by every stage; the command line reports it as exit 2."""

from __future__ import annotations


class ExportError(ValueError):
    """Bad input (unknown tag or run, bad filter or columns, bad query file, existing output)."""
