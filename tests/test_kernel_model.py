"""The whole tiny LLaVA with every Triton kernel on (MINILLAVA_KERNELS=force, the interpreter on CPU) against the
plain-torch path (MINILLAVA_KERNELS=0): logits, the training loss, the gradient of every parameter, and cached
decoding, on padded batches with images. Also checks that each kernel really ran (its autograd node is in the
graph, the decode launcher was called) and that the switch is read at call time.
"""
import copy
import os

import pytest
import torch

from minillava.llava import IGNORE_INDEX
from tests.test_model import tiny_model

import minillava.kernels.attention as A
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU kernel tests need TRITON_INTERPRET=1")

KERNEL_NODES = {"AttentionFunctionBackward", "SwiGLUFunctionBackward", "LinearQuickGELUFunctionBackward",
                "RMSNormFunctionBackward", "RoPEFunctionBackward", "CrossEntropyFunctionBackward"}
# fp32 end to end: the kernels use exact fp32 products ("ieee" dots) and differ from the reference only in the
# order of their fp32 sums, compounded over 2 vision + 2 text layers. Measured here: loss equal, logits within
# 1e-7, gradients within 2.2e-8 (largest |grad| 0.09). The 5-10x margin is for another CPU's BLAS summing the
# reference's matmuls in another order; a real kernel error is orders of magnitude larger.
LOGITS_TOL = dict(atol=1e-6, rtol=1e-5)
GRAD_TOL = dict(atol=1e-7, rtol=1e-5)


def _graph_nodes(t):
    """Names of every autograd node that t depends on."""
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(fn.name())
        stack.extend(f for f, _ in fn.next_functions)
    return names


def _batch(model, padding_side):
    """Two sequences with one image each, the second shorter and padded; labels supervise the answers."""
    img = model.config.image_token_id
    a, b = [1, 9, img, 10, 11, 12, 13], [1, img, 14, 15]
    pad = [0] * (len(a) - len(b))
    left = padding_side == "left"
    ids = torch.tensor([a, pad + b if left else b + pad])
    mask = torch.tensor([[1] * len(a), [0] * len(pad) + [1] * len(b) if left else [1] * len(b) + [0] * len(pad)])
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :3 if left else 2] = IGNORE_INDEX  # the prompt is not supervised
    pix = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return ids, labels, pix, mask


def test_training_step_matches_reference(monkeypatch):
    """Loss (cross-entropy kernel) and the gradient of every parameter, through vision tower, projector and LM,
    on a right-padded batch as training collates it (left padding is covered by the decoding test below)."""
    model = tiny_model().train()
    batch = _batch(model, "right")
    results = {}
    for mode in ("force", "0"):
        monkeypatch.setenv("MINILLAVA_KERNELS", mode)  # read at call time: the same module switches path
        m = copy.deepcopy(model)
        loss_sum, n = m.loss(*batch)
        nodes = _graph_nodes(loss_sum)
        (loss_sum / n).backward()  # as training normalises: grad_output 1/n reaches the kernel's backward
        results[mode] = loss_sum, nodes, {k: p.grad for k, p in m.named_parameters()}
    (loss, nodes, grads), (ref_loss, ref_nodes, ref_grads) = results["force"], results["0"]
    assert KERNEL_NODES <= nodes, f"kernels that did not run: {KERNEL_NODES - nodes}"
    assert not KERNEL_NODES & ref_nodes, f"kernels that ran with MINILLAVA_KERNELS=0: {KERNEL_NODES & ref_nodes}"
    torch.testing.assert_close(loss, ref_loss, **LOGITS_TOL)
    # the unused parts (CLIP's last layer and post_layernorm, past vision_feature_layer=-2) get no gradient
    assert {k for k, g in grads.items() if g is None} == {k for k, g in ref_grads.items() if g is None}
    n_checked = 0
    for name, g in grads.items():
        if g is not None:
            # a key bias shifts every score of a query equally, which softmax ignores: its true gradient is 0
            assert name.endswith("k_proj.bias") or g.abs().sum() > 0, name
            torch.testing.assert_close(g, ref_grads[name], **GRAD_TOL, msg=lambda m: f"grad of {name}: {m}")
            n_checked += 1
    assert n_checked > 40  # every layer of the vision tower, projector and LM, not just a few


def test_logits_and_cached_decoding_match_reference(monkeypatch):
    """Full-sequence logits of a left-padded batch (no_grad: the kernels' inference paths), then the decode engine
    on both sequences: prefill (causal attention from a cached prefix) and decode steps in which every slot reads
    the whole cache under its own length mask, through the flash-decoding kernel."""
    from minillava.engine import Engine, Request
    model = tiny_model()
    ids, _, pix, mask = _batch(model, "left")
    rows = [[t for t, m in zip(r, mr) if m] for r, mr in zip(ids.tolist(), mask.tolist())]
    calls = []
    decode = A.attention_decode
    monkeypatch.setattr(A, "attention_decode", lambda *a, **kw: (calls.append(1), decode(*a, **kw))[1])
    steps = {}
    for mode in ("force", "0"):
        monkeypatch.setenv("MINILLAVA_KERNELS", mode)
        with torch.no_grad():
            logits = [model(ids, pix, mask)]
        engine = Engine(model, slots=2, max_seq_len=64)
        real = engine._sample
        monkeypatch.setattr(engine, "_sample", lambda lg, slots: (logits.append(lg.clone()), real(lg, slots))[1])
        engine.run([Request(r, pix[i:i + 1], max_new_tokens=3) for i, r in enumerate(rows)])
        steps[mode] = logits
        if mode == "force":
            assert len(calls) == 2 * model.config.text.num_hidden_layers  # 2 decode steps x layers
    assert len(steps["force"]) == len(steps["0"]) == 1 + 2 + 2  # forward, 2 prefills, 2 decode steps
    for i, (a, b) in enumerate(zip(steps["force"], steps["0"])):
        torch.testing.assert_close(a, b, **LOGITS_TOL, msg=lambda m: f"step {i}: {m}")
    assert len(calls) == 2 * model.config.text.num_hidden_layers  # and none with MINILLAVA_KERNELS=0
