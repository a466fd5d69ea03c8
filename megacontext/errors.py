"""User-facing errors.

Every error a user can cause (bad config, bad input file, a foreign or corrupt
artifact) is a `MegaContextError` whose message is one line naming the key or
file and what to do. The CLI prints it without a traceback and exits with 2.
"""


class MegaContextError(Exception):
    """An error the user can fix; the message says how."""


class ConfigError(MegaContextError):
    """A config key is unknown or has a bad value."""


class InputDataError(MegaContextError):
    """A corpus file (or the corpus folder) cannot be used."""


class ArtifactError(MegaContextError):
    """An artifact on disk is missing, corrupt, or was made by something else."""


class GateError(MegaContextError):
    """A cycle did not pass the validation gate (or was never evaluated), so it cannot be promoted."""


class RegressionError(MegaContextError):
    """The nightly regression found the champion worse than its recorded numbers beyond the noise band."""
