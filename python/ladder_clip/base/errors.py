"""The one exception type the CLI turns into a single clear line on stderr and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user (paths, data, checkpoints, options): message only, no traceback."""
