"""The one exception type for bad user input: the CLI prints it as one line, no traceback."""


class UserInputError(ValueError):
    """Bad input from the user: the message names the thing (file, field, class) and the fix."""
