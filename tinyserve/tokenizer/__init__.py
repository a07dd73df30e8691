"""Text <-> token ids, built on HF's Rust `tokenizers` library.

Two sources are supported:

* a GGUF file (`Tokenizer.from_gguf`): llama.cpp stores the vocabulary, the BPE merges, the
  token types and the special ids as metadata, not as a `tokenizer.json`, so we rebuild the
  tokenizer from those pieces (gguf_bpe.py). Only byte-level BPE (`tokenizer.ggml.model ==
  "gpt2"`, used by SmolLM2, Llama 3, Qwen 2, ...) is implemented.
* an HF-style directory (`Tokenizer.from_dir`) holding a `tokenizer.json` (hf_dir.py).

    Tokenizer           encode/decode, special and stop ids, apply_chat_template (core.py)
    IncrementalDecoder  token ids -> text deltas for streaming (incremental.py)
    TokenizerError      what every failure here raises (errors.py)

The chat template is compiled in a jinja2 sandbox (chat_template.py). HF transformers is
deliberately not used here: it is a heavy import and is only the test oracle
(`tests/test_tokenizer.py` checks our ids against it on the real SmolLM2 file).
"""

from .core import Tokenizer
from .errors import TokenizerError
from .incremental import IncrementalDecoder

__all__ = ["Tokenizer", "TokenizerError", "IncrementalDecoder"]
