"""The one user-facing error type: bad input that the CLI reports as a single ``lcm: error:`` line."""


class ModelError(ValueError):
    """A model folder, image, option or request is missing or malformed."""
