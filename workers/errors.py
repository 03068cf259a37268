"""User errors (`ConfigError`: one line and exit code 2) and failed trials (`TrialFailed`), both picklable."""

from __future__ import annotations


class ConfigError(Exception):
    """A user error in an input file: which file, which field, and what was expected."""

    def __init__(self, file: str | None, field: str | None, message: str) -> None:
        self.file = file
        self.field = field
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ": ".join(part for part in (self.file, self.field) if part)
        return f"{where}: {self.message}" if where else self.message

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str | None, str | None, str]]:
        # Exceptions pickle as `cls(*args)`: across Ray a trial's error must arrive whole.
        return type(self), (self.file, self.field, self.message)

    def located(self, file: str) -> ConfigError:
        """The same error, attributed to `file` when it has no file yet."""
        return self if self.file else ConfigError(file, self.field, self.message)


class TrialFailed(Exception):
    """A trial that ended failed; its message is the one-line cause (it crosses Ray by pickle)."""
