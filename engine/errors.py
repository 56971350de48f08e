"""The project's errors, without torch: the CLI's light commands (`adlab methods`) import them cheaply.

`engine.api` re-exports every name here; import them from either.
"""

from __future__ import annotations

from dataclasses import dataclass


class AdlabError(Exception):
    """Base of every error the engine raises on purpose (shown to users as a message)."""


class NotFittedError(AdlabError):
    """predict/save called before fit."""


class ConfigError(AdlabError):
    """A parameter or option is invalid (unknown method, bad value, missing labelled set)."""


class WeightsError(AdlabError):
    """Backbone weights cannot be found or do not match the architecture."""


@dataclass(frozen=True)
class Problem:
    """One validation problem: which file, what is wrong, what to do."""

    path: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        s = f"{self.path}: {self.message}"
        return f"{s} ({self.hint})" if self.hint else s


class DataValidationError(AdlabError):
    """A dataset or upload failed validation. Holds every problem found, not just the first."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        head = f"{len(self.problems)} problem(s) with the data:"
        super().__init__("\n".join([head, *("  - " + str(p) for p in self.problems)]))


class MethodFailure(AdlabError):
    """A method produced unusable output (NaN scores, diverged training, collapse)."""
