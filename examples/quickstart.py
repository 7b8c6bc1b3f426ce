"""A first look: global-token attention on random inputs, checked against the dense reference.

    python examples/quickstart.py
"""

import torch

from globalattn import GlobalAttention, block_bounds, global_attention

torch.manual_seed(0)
print("blocks of 16 tokens, block size 5:", block_bounds(16, 5))

q, k, v = (torch.randn(1, 4, 4096, 64) for _ in range(3))  # (B, H, S, D)
out = global_attention(q, k, v, block_size=64, causal=True)  # blocked PyTorch backend
ref = global_attention(q, k, v, block_size=64, causal=True, backend="reference")
print(f"output {tuple(out.shape)}, max |blocked - reference| = {(out - ref).abs().max():.2e}")

layer = GlobalAttention(256, 4, block_size=32, causal=True)
x = torch.randn(2, 1000, 256)  # (B, T, E)
y, _ = layer(x)
print(f"GlobalAttention layer: {tuple(x.shape)} -> {tuple(y.shape)}")
