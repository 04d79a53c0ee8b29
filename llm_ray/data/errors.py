"""The data stage's error for users."""


class PrepareError(Exception):
    """The corpus cannot be turned into training data, described for the user."""
