"""The two errors a user can fix: bad options and bad data. Both print as one line (`error: ...`)
from the CLI, so their messages name the key, or the file, line and field."""


class ConfigError(ValueError):
    """A config value or file is invalid; the message names the key."""


class DataError(ValueError):
    """Input data is missing or invalid; the message names file, line and field."""
