"""Errors that reach the user as one clear line."""


class UserError(Exception):
    """Bad input or environment: the message names the problem and the fix."""
