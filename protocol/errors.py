"""The one exception type users see: a message that says what is wrong and what to do next."""


class EdgeopsError(Exception):
    """An error caused by the user's input or environment, shown as one line without a traceback."""


class BuildFailed(EdgeopsError):
    """No candidate fitted: the one-line reason, plus the report of every candidate tried, which a user
    needs to decide what to change (printed with --json too)."""

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report
