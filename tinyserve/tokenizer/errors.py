"""The tokenizer package's one exception, in its own module because every other module of the
package raises it and core.py imports them all."""


from ..errors import TinyserveError


class TokenizerError(TinyserveError, ValueError):
    """A tokenizer could not be built or used (missing file, unsupported model, no template...)."""
