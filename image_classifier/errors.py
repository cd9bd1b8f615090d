"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(Exception):
    """Bad input: reported as one line saying what is wrong and what to do, exit status 2."""
