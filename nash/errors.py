"""What `nash: error:` prints: mistakes in the user's config, files or command line.

Every user mistake is a UserError: the CLI prints its message on one line and exits 2.
Anything else is a bug or a failure of the machine, and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix: the message names the key, the file and line, or the flag."""
