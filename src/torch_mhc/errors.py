"""The error every room raises for bad user input; the ``mhc`` command reports it in one paragraph
with exit code 2 and no traceback. Imports nothing from the package."""


class UserError(Exception):
    """A problem with the user's input (config, data, run directory, checkpoint): reported in one
    paragraph, exit code 2, no traceback."""
