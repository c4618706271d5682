"""The one exception type for bad user input (config, data, checkpoint).

Entry points catch it and print a single line instead of a traceback.
"""


class SetupError(Exception):
    """Bad input from the user: a config key, a data file, a checkpoint. The message names it.

    ``everywhere``: every process of a multi-process run raises this very error (a config problem,
    an error the processes agreed on), so only rank 0 prints it."""

    def __init__(self, message: str = "", everywhere: bool = False):
        super().__init__(message)
        self.everywhere = everywhere
