"""User-facing errors: one line, naming the file and the problem."""

from __future__ import annotations

import os


class SDSegInputError(Exception):
    """Bad input from the user (a file, a path, a setting). The CLI prints it on one line and exits 2."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        text = " ".join(str(message).split())
        super().__init__(f"{self.path}: {text}" if self.path else text)


class WeightsError(SDSegInputError):
    """Weights that are missing, unreadable or do not fit the model they are loaded into."""
