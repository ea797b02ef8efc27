"""User-facing errors: the CLI turns these into one line on stderr and exit code 2."""


class UserError(Exception):
    """A problem with what the user asked for (a path, a file, a config), not a bug.

    The message is one line: what is wrong, where, and how to mend it.
    """
