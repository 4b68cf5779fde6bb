"""The few exceptions evolm raises for user mistakes; the CLI turns them into one line + exit 2."""


class EvolmError(Exception):
    """A problem the user can fix; the message says what and how."""


class ConfigError(EvolmError):
    """The experiment YAML is malformed or holds an invalid value (message names the field)."""


class DataError(EvolmError):
    """A data file is missing, empty, undecodable, wrongly formatted or too small."""


class ModelError(EvolmError):
    """A model or tokenizer path does not exist or cannot be loaded."""


class RunDirError(EvolmError):
    """A run directory is missing, not a run, or its files are unusable."""


class ClusterError(EvolmError):
    """The Ray cluster cannot be reached or went away."""


class DiskFullError(EvolmError):
    """The disk (or the quota) filled up while the run wrote; the run can be resumed once there is space."""
