"""The one user-facing error type: bad input that the CLI reports as a single ``lcm: error:`` line."""


class ModelError(ValueError):
    """A model folder, image, option or request is missing or malformed."""


def one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type's name when it has none): what a one-line
    error report shows."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
