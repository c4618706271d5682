"""The one exception type for bad user input (config, data, checkpoint).

Entry points catch it and print a single line instead of a traceback.
"""


class SetupError(Exception):
    """Bad input from the user: a config key, a data file, a checkpoint. The message names it."""
