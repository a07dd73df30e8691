"""The package's own exceptions, so a caller can catch tinyserve's failures as one family.

Input errors stay ValueError/TypeError subclasses where they are raised (``ConfigError``,
``GGUFError``, ...): this module holds what belongs to no single module.
"""


class TinyserveError(Exception):
    """Base of the errors below."""


class RequestFailed(TinyserveError, RuntimeError):
    """A request ended with ``finish_reason="error"``: its processing raised (a logits
    processor, a parameter that slipped past validation, or the model step it was part of).
    The engine and every other request carried on; the message says what raised."""
