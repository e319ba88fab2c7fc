"""Exceptions kiln raises for problems a user can act on."""


class KilnError(Exception):
    """Base class: every message says what went wrong and what to do."""


class UnsupportedModelError(KilnError):
    """The checkpoint's architecture cannot be captured by kiln."""


class EngineMismatchError(KilnError):
    """The engine was built by another kiln/torch version or for another device: rebuild it."""


class RequestError(KilnError):
    """One request is invalid (too long, bad sampling values); other requests are unaffected."""
