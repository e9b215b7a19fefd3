"""User-facing errors: one line that names the file, line or key and the fix; no traceback."""


class DistftError(Exception):
    """Bad input (config, data, paths). Entry points print it as one message and exit 2."""


class ConfigError(DistftError):
    pass


class DataError(DistftError):
    pass
