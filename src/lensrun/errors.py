"""The one exception type users see: a specific message, no traceback, raised before any model work."""


class LensrunError(ValueError):
    """Bad input or an unusable model folder; the message says what was wrong and what is allowed."""
