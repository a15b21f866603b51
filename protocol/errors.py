"""The one exception type users see: a message that says what is wrong and what to do next."""


class EdgeopsError(Exception):
    """An error caused by the user's input or environment, shown as one line without a traceback."""
