"""The project's expected errors. A stage prints these as one line naming the thing that is wrong;
anything else (a CUDA out-of-memory error, a bug) keeps its traceback."""
from __future__ import annotations


class MaskfoldError(Exception):
    """Base of every error a user can act on: bad config, bad data, missing or stale artifacts."""


class ConfigError(MaskfoldError, ValueError):
    """A config file or override that cannot be used; the message names the key and what is allowed."""


class DataError(MaskfoldError, ValueError):
    """Bad input data. Holds every problem found, each naming its file or row."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        shown = "\n  - ".join(self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(f"{len(self.problems)} data problem(s):\n  - {shown}{more}")

    def __reduce__(self):  # rebuilt from its problems, not its message, when it crosses processes (Ray)
        return type(self), (self.problems,)


class ArtifactError(MaskfoldError, RuntimeError):
    """An artifact a stage needs is missing, incomplete or was made from other inputs."""


class MissingArtifactError(ArtifactError, FileNotFoundError):
    pass


class StaleArtifactError(ArtifactError):
    pass


class WriteError(MaskfoldError, OSError):
    """An artifact could not be written (disk full, no permission); the previous version is intact."""
