"""Shared fixtures. TRITON_INTERPRET must be set before anything imports triton."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Never more threads than cores: under pytest-xdist (``make test`` runs a worker per core) each
# worker takes its share, and so does every process it starts (notebook kernels, CLI runs)
# through OMP_NUM_THREADS; two workers of two threads each on two cores run slower than one.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
torch.set_num_threads(_THREADS)


def smollm2_path():
    """The real model file; tests that need it skip (with the reason) if it is not cached."""
    from tinyserve.weights import registry
    env = os.environ.get("TINYSERVE_SMOLLM2")
    if env:
        return env
    p = registry.cached_path("smollm2")
    if p is None:
        pytest.skip("SmolLM2 GGUF not cached: run `make model` (make test does it first)")
    return str(p)


@pytest.fixture
def one_thread():
    """Tests of many tiny ops (engine steps, draft rounds, toy models): on a busy 2-core
    machine torch's threads spin against each other and make each op many times slower.
    Put torch's setting back afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smollm2_file():
    return smollm2_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_file):
    """(model, tokenizer) in fp32 on CPU, loaded once per test session."""
    from tinyserve import load_model
    return load_model(smollm2_file, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_file):
    """HF transformers' own reading of the same GGUF: the independent oracle."""
    transformers = pytest.importorskip("transformers")
    from pathlib import Path
    p = Path(smollm2_file)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    return model, tok


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
