"""CUDA-graph decode replays exactly what eager decode computes (on a GPU)."""
import pytest
import torch

from tinyserve.config import ModelConfig
from tinyserve.model import Transformer

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_graphed_decode_equals_eager_decode(backend):
    from tinyserve.generate import benchmark_decode
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_layers=3,
                      num_heads=8, num_kv_heads=2, head_dim=32 * 2, max_position_embeddings=512)
    m = Transformer(cfg, backend=backend).to("cuda", torch.bfloat16).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.05)
    ids = torch.randint(0, 1000, (4, 17), device="cuda")
    eager = benchmark_decode(m, ids, 24, cuda_graph=False)
    graphed = benchmark_decode(m, ids, 24, cuda_graph=True)
    assert torch.equal(eager["tokens"], graphed["tokens"])


def test_graph_needs_cuda_model():
    from tinyserve.cuda_graph import GraphedDecodeStep
    from tinyserve.kv_cache import KVCache
    cfg = ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=4)
    with pytest.raises(RuntimeError, match="CUDA"):
        GraphedDecodeStep(Transformer(cfg), KVCache(cfg, 1, 8))
