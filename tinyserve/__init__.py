"""tinyserve: LLM inference optimization, from PyTorch references to Triton kernels.

    import tinyserve
    llm = tinyserve.LLM("smollm2")
    print(llm.generate("The capital of France is")[0].outputs[0].text)

Heavy imports (torch, gguf) happen on first use of a name, so ``import tinyserve`` is cheap.
"""
__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "llm", "RequestOutput": "llm", "CompletionOutput": "llm",
    "SamplingParams": "sampling", "EngineConfig": "engine.config",
    "load_model": "loader",
    "ModelConfig": "config",
    "KVCache": "kv_cache",
    "Transformer": "model",
    "Tokenizer": "tokenizer",
    "model_path": "weights.registry",
    "TinyserveError": "errors", "RequestFailed": "errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'tinyserve' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
