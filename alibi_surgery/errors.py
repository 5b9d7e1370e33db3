"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class UsageError(ValueError):
    """Bad input from the user: a path, a model, a prompt, an option. The message is one line and names the problem."""
