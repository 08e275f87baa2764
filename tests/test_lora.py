"""LoRA: which layers get adapters, a zero update at start, gradients only to the adapters, dropout, and a merge
that equals the unmerged forward and gives back the base model's parameter names."""
import torch
import torch.nn as nn

from minillava.config import get_preset
from minillava.llama import LlamaMLP
from minillava.llava import Llava
from minillava.lora import LoRALinear, apply_lora, merge_lora

PROJS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny(seed=0):
    torch.manual_seed(seed)
    model = Llava(get_preset("tiny"))
    for p in model.parameters():
        nn.init.normal_(p, std=0.1)
    return model.requires_grad_(False)  # as train.py: frozen, then adapters (and the projector) train


def inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (2, 11), generator=g)
    ids[:, 2] = cfg.image_token_id
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 8:] = False  # right padding
    pixels = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return ids, pixels, mask


def test_every_llm_linear_but_lm_head_is_adapted_and_only_adapters_train():
    model = tiny()
    names = apply_lora(model.language_model.model, r=4, alpha=8, dropout=0.0)
    n_layers = model.config.text.num_hidden_layers
    assert sorted(names) == sorted(f"layers.{i}.{p}" for i in range(n_layers) for p in PROJS)
    assert not isinstance(model.language_model.lm_head, LoRALinear)
    trainable = sorted(n for n, p in model.language_model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"model.{n}.lora_{ab}" for n in names for ab in "AB")
    lora = model.language_model.model.layers[0].self_attn.q_proj
    assert lora.lora_A.shape == (4, 64) and lora.lora_B.shape == (64, 4) and lora.scaling == 2.0


def test_starts_as_the_base_model_and_trains_only_a_and_b():
    model = tiny()
    ids, pixels, mask = inputs(model.config)
    with torch.no_grad():
        base = model(ids, pixels, mask)
    apply_lora(model.language_model.model, r=4, alpha=8, dropout=0.0)
    out = model(ids, pixels, mask)
    # B = 0: the update is exactly zero; only the unfused SwiGLU's rounding differs from the fused kernel
    torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)
    out[mask.nonzero(as_tuple=True)].square().mean().backward()  # loss over the real (unpadded) positions
    lora = model.language_model.model.layers[1].mlp.gate_proj
    assert lora.lora_B.grad.abs().sum() > 0  # dL/dB = scaling * dL/dy (A x)^T: nonzero
    assert lora.lora_A.grad.abs().sum() == 0  # dL/dA = scaling * B^T ...: zero while B is zero
    assert lora.base.weight.grad is None and model.language_model.lm_head.weight.grad is None


def test_merge_equals_unmerged_forward_and_restores_names():
    model = tiny()
    names_before = [n for n, _ in model.named_parameters()]
    apply_lora(model.language_model.model, r=3, alpha=5, dropout=0.3)
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_B.data = torch.randn(m.lora_B.shape, generator=g) * 0.2  # a real update
    model.eval()  # dropout off
    ids, pixels, mask = inputs(model.config)
    with torch.no_grad():
        unmerged = model(ids, pixels, mask)
        q = model.language_model.model.layers[0].self_attn.q_proj
        expected_w = q.base.weight + (5 / 3) * q.lora_B @ q.lora_A
        assert merge_lora(model) == 7 * model.config.text.num_hidden_layers
        merged = model(ids, pixels, mask)
    assert [n for n, _ in model.named_parameters()] == names_before
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert not any("forward" in m.__dict__ for m in model.modules() if isinstance(m, LlamaMLP))  # fused again
    torch.testing.assert_close(model.language_model.model.layers[0].self_attn.q_proj.weight, expected_w,
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=2e-5)
    assert (unmerged - tiny()(ids, pixels, mask)).abs().max() > 1e-2  # and the update did change the model


def test_dropout_applies_to_the_adapter_input_in_training_only():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=False)
    lora = LoRALinear(lin, r=4, alpha=4, dropout=0.5)
    nn.init.normal_(lora.lora_B)
    x = torch.randn(5, 16)
    lora.train()
    torch.manual_seed(1)
    a = lora(x)
    torch.manual_seed(2)
    b = lora(x)
    assert not torch.equal(a, b)
    torch.manual_seed(1)
    keep = torch.nn.functional.dropout(x, 0.5, training=True)  # the same mask as the first call
    torch.testing.assert_close(a, lin(x) + (keep @ lora.lora_A.T @ lora.lora_B.T), rtol=1e-6, atol=1e-6)
    lora.eval()
    torch.testing.assert_close(lora(x), lin(x) + x @ lora.lora_A.T @ lora.lora_B.T, rtol=1e-6, atol=1e-6)
