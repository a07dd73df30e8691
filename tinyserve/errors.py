"""The package's own exceptions, so a caller can catch tinyserve's failures as one family.

Every error tinyserve raises on purpose is a ``TinyserveError``; each is also the builtin
exception that fits (ValueError for bad input, RuntimeError for a failure at run time), so
``except ValueError`` clauses written before the family existed keep working:

    TinyserveError
      InvalidParameter (ValueError)   an argument of the API: SamplingParams, prompts, options
        ParameterTypeError (+TypeError) ... of the wrong type
      ConfigError (ValueError)        config.json / GGUF metadata        tinyserve.config
      GGUFError (ValueError)          a GGUF file                         weights.gguf_blocks
      CheckpointError (ValueError)    an HF checkpoint directory          weights.safetensors
      WeightsError (ValueError)       a state dict that does not fit      model
      TokenizerError (ValueError)     tokenizer files or templates        tokenizer.errors
      ModelFetchError (RuntimeError)  fetching or verifying a model file  weights.cache
      OutOfBlocksError (RuntimeError) the KV block pool (engine internal) engine.block_manager
      RequestFailed (RuntimeError)    one request's processing raised     here

Concern-specific classes live beside the code that raises them; this module holds the base,
what belongs to no single module, and ``positive_int``, the check every count option shares.
It imports nothing, so any module may import it.
"""


class TinyserveError(Exception):
    """Base of every error tinyserve raises on purpose."""


class InvalidParameter(TinyserveError, ValueError):
    """An argument the caller passed is out of range or malformed; the message names it, the
    value, and what is allowed."""


class ParameterTypeError(InvalidParameter, TypeError):
    """An argument of the wrong type (a dict where SamplingParams go, floats as token ids)."""


class RequestFailed(TinyserveError, RuntimeError):
    """A request ended with ``finish_reason="error"``: its processing raised (a logits
    processor, a parameter that slipped past validation, or the model step it was part of).
    The engine and every other request carried on; the message says what raised."""


def positive_int(name: str, v) -> int:
    """The one check of a count option (engine sizes, block counts): an int (not a bool) >= 1."""
    if not isinstance(v, int) or isinstance(v, bool):
        raise ParameterTypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if v < 1:
        raise InvalidParameter(f"{name} must be >= 1, got {v}")
    return v
