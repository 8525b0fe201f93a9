"""The one exception type users see: a message that says what is wrong and how to fix it."""


class UserError(Exception):
    """Bad input or environment. The CLI prints the message on one line and exits non-zero."""
