"""The one exception type users see: a message that says what is wrong and how to fix it."""


class UserError(Exception):
    """Bad input or environment. The CLI prints the message on one line and exits non-zero.

    Under a launcher: `every_rank` means every process raises this error together (no rank needs to
    be stopped by force); `quiet` means another rank reports it, so this one exits without a word.
    """

    def __init__(self, *args, every_rank: bool = False, quiet: bool = False):
        super().__init__(*args)
        self.every_rank = every_rank
        self.quiet = quiet
