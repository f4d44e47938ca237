"""The package's one error type: low-level failures are wrapped in it with a reason a person can act on."""


class OmniVisionError(Exception):
    """A failure with a message meant for the user (bad input, missing or mismatched files)."""
