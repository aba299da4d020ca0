"""The benchmark scripts' own correctness: a speed comparison is only worth reading if both sides compute
the same thing."""

import torch

import warp_min as W
from experiments.bench.decode_ceiling import CeilingDecoder


def test_the_ceiling_decoder_is_the_same_network_as_model_py():
    """experiments/bench/decode_ceiling.py's fused decoder against Transformer.forward with its KV cache,
    token by token over a prompt and ten sampled tokens; and a perturbed weight is noticed."""
    net = W.toy_network(W.Config())
    model = W.Transformer(net, generator=torch.Generator().manual_seed(1)).eval()
    with torch.no_grad():   # non-zero norm offsets, so a wrong (1 + w) would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(2))
    tokens = torch.randint(0, net.vocab_size, (3, 16), generator=torch.Generator().manual_seed(3))
    dec = CeilingDecoder(model, batch=3, max_len=16)
    caches = [{"max_len": 16} for _ in model.model.layers]
    with torch.inference_mode():
        for pos in range(16):
            ours = model(tokens[:, pos:pos + 1], caches, start_pos=pos)[:, -1]
            assert torch.allclose(dec.decode(tokens[:, pos], pos), ours, atol=1e-5, rtol=0), pos
        with torch.no_grad():
            dec.layers[1]["down"][0, 0] += 0.5
        assert not torch.allclose(dec.decode(tokens[:, 0], 0), model(tokens[:, :1])[:, -1], atol=1e-5, rtol=0)
