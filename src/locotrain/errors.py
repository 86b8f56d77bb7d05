"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input: a config key, a corpus file, a checkpoint, an output folder.

    The message names the problem and the fix, in one line.
    """
