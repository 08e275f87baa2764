"""Weight-only int8 / int4 (kernels/quant.py, weights/quantize.py): the formats, every compute path against the
dequantized reference, quantizing while loading, quantized checkpoints and their errors, and bf16 on the CPU.

The Triton kernel runs in the interpreter here (tests/conftest.py sets TRITON_INTERPRET=1), fp32 and fp16."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import minillava.kernels.quant as Q
import minillava.weights.load as L
from minillava.config import get_preset
from minillava.weights import CheckpointError, load_llava, save_llava, write_random_checkpoint
from minillava.weights import quantize as wq
from minillava.weights.quantize import QUANT_KEY, Quantization

ROOT = Path(__file__).resolve().parent.parent
TINY = get_preset("tiny")  # LLM widths 64 / 96: int4 groups of 32 divide them, 64 does not divide 96
SETTINGS = [Quantization(8), Quantization(4, 32)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def layer(N, K, bits, group_size=None, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) * 0.1 + 0.02)  # not centred on 0: offsets matter
        if bias:
            lin.bias.copy_(torch.randn(N, generator=g))
    return lin, Q.QuantLinear.from_float(lin, bits, group_size)


def reference(x, ql, bias=True):
    return Q.quant_linear_reference(x, ql.qweight, ql.scales, ql.offsets, ql.group_size, ql.bias if bias else None)


# ----------------------------------------------------------------------------------------------------------
# The formats
def test_int8_codes_are_the_nearest_step_of_a_scale_that_fits_the_row():
    w = torch.randn(9, 70, generator=torch.Generator().manual_seed(1))
    w[3] = 0  # an all-zero row: codes 0, scale 0
    d = Q.quantize(w, 8)
    q, s = d["qweight"], d["scales"]
    assert q.dtype == torch.int8 and q.shape == (9, 70) and s.dtype == torch.bfloat16 and s.shape == (9,)
    sf = s.float()
    assert (sf[:, None] * 127 >= w.abs()).all()  # rounded up: the largest weight fits without clamping
    assert (sf <= w.abs().amax(1) / 127 * (1 + 2 ** -7)).all()  # ... by at most one bf16 step
    err = (w - Q.dequantize(q, s)).abs()
    assert (err <= sf[:, None] / 2 * (1 + 1e-6)).all()  # every weight within half a step of its code
    assert (q[3] == 0).all() and s[3] == 0
    assert q.abs().amax(1)[torch.arange(9) != 3].min() >= 126  # the scale is tight: the codes' range is used


def test_int4_nibble_order_codes_and_offsets():
    G = 32
    w = torch.stack([torch.linspace(-1.0, 2.0, 64), torch.linspace(3.0, 3.5, 64)])  # row 1 far from 0
    d = Q.quantize(w, 4, G)
    q, s, o = d["qweight"], d["scales"], d["offsets"]
    assert q.dtype == torch.uint8 and q.shape == (2, 32) and s.shape == o.shape == (2, 2)
    codes = torch.stack([q & 15, q >> 4], -1).view(2, 64).long()  # byte j: column 2j low, column 2j + 1 high
    # each group's smallest weight gets code 0 and its largest code 15; codes rise with the weights
    for g in range(2):
        c = codes[:, g * G:(g + 1) * G]
        assert (c[:, 0] == 0).all() and (c[:, -1] == 15).all() and (c.diff(dim=1) >= 0).all()
    assert q[0, 0] & 15 == codes[0, 0] and q[0, 0] >> 4 == codes[0, 1]
    sf, of = s.float().repeat_interleave(G, 1), o.float().repeat_interleave(G, 1)
    assert torch.equal(Q.dequantize(q, s, o, G), (codes.float() - 8) * sf + of)  # the format's meaning
    # within half a step, plus the offset's own bf16 rounding
    assert ((w - Q.dequantize(q, s, o, G)).abs() <= sf / 2 * (1 + 1e-6) + of.abs() * 2 ** -9).all()


def test_shapes_the_formats_refuse_are_named():
    with pytest.raises(ValueError, match="groups of 64 do not divide its 96 input features"):
        Q.quantize(torch.randn(8, 96), 4, 64)
    with pytest.raises(ValueError, match="group size 48"):
        Q.QuantLinear(96, 8, 4, 48)
    with pytest.raises(ValueError, match="3 bits"):
        Quantization(3)
    with pytest.raises(ValueError, match="int8 is per output channel"):
        Quantization(8, 64)
    assert Quantization.parse("none") is None and Quantization.parse("int4", 128) == Quantization(4, 128)
    with pytest.raises(ValueError, match="expected none, int8 or int4"):
        Quantization.parse("int2")


# ----------------------------------------------------------------------------------------------------------
# The compute paths, each against the dequantized reference
@pytest.mark.parametrize("bits, G", [(8, None), (4, 32), (4, 64)])
@pytest.mark.parametrize("lead", [(7,), (2, 5)])
def test_blocked_reference_equals_the_whole_one(bits, G, lead, monkeypatch):
    monkeypatch.setattr(Q, "BLOCK_ROWS", 48)  # 3 blocks, the last one partial
    lin, ql = layer(112, 128, bits, G, bias=True)
    x = torch.randn(*lead, 128)
    y = ql(x)  # more rows than PACKED_MAX_ROWS and not packed: the blocked path, in fp32
    assert y.shape == (*lead, 112)
    torch.testing.assert_close(y, reference(x, ql), atol=1e-5, rtol=1e-5)
    # and the dequantized weight is close to the dense one: the layer still computes the linear
    assert (y - lin(x)).abs().max() < (0.02 if bits == 8 else 0.3) * lin(x).abs().max()


def bf16_close(y, ref):
    """PyTorch's CPU kernels compute in bf16: the output's own rounding (2^-8 relative) and a bf16-rounded x."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=2 ** -7, atol=2 ** -7 * ref.abs().max().item())


@pytest.mark.parametrize("M", [1, 2, 4])
def test_int8_decoding_rows_run_pytorchs_kernel(M, monkeypatch):
    calls = []
    packed = Q._cpu_packed
    monkeypatch.setattr(Q, "_cpu_packed", lambda x, layer: (calls.append(x.shape), packed(x, layer))[1])
    _, ql = layer(96, 64, 8, bias=True)
    x = torch.randn(M, 64)
    y = ql(x)
    assert calls == [(M, 64)]
    bf16_close(y, reference(x.bfloat16().float(), ql))
    ql(torch.randn(Q.PACKED_MAX_ROWS + 1, 64))  # a prefill: the blocked path
    assert len(calls) == 1


def test_int8_digits_hold_x_within_a_step_over_508():
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(2)) * torch.tensor([1, 1e-3, 1e3, 7, 1])[:, None]
    x[4] = 0  # an all-zero row: digits 0
    x[3, 17] = -50  # an outlier sets its row's step
    digits, step = Q.int8_digits(x)
    assert digits.dtype == torch.int8 and digits.shape == (10, 300) and step.shape == (5, 1)
    assert digits.abs().max() <= 127 and not digits[4].any() and not digits[9].any()
    hi, lo = digits[:5].double(), digits[5:].double()
    err = (x.double() - step.double() * (hi + lo / Q.X_DIGIT)).abs()
    assert (err <= step.double() / (2 * Q.X_DIGIT) * (1 + 1e-6)).all()
    assert (err[:4].amax(1) > step[:4, 0].double() / (2 * Q.X_DIGIT) * 0.5).all()  # the bound is tight, not loose
    assert torch.allclose(step[:4, 0], x[:4].abs().amax(1) / 127)


needs_onednn_int8 = pytest.mark.skipif(Q.onednn_int8_problem() is not None,
                                       reason=f"oneDNN's int8 matmul: {Q.onednn_int8_problem()}")


@needs_onednn_int8
@pytest.mark.parametrize("M", [1, 3, 9, 40])
def test_int8_packed_for_the_cpu_is_within_the_digits_bound_of_the_reference(M):
    _, ql = layer(96, 256, 8, bias=True)
    ref_layer = Q.QuantLinear(256, 96, 8, bias=True)
    ref_layer.qweight, ref_layer.scales, ref_layer.bias = ql.qweight.clone(), ql.scales.clone(), ql.bias.clone()
    ql.pack_for_cpu()
    assert ql.cpu_packed and ql.scales is None and ql.qweight.is_mkldnn  # the portable codes are not kept twice
    x = torch.randn(M, 256, generator=torch.Generator().manual_seed(M)) * 3
    y = ql(x)
    # the error is x's digits' (<= step / 508 per value) carried through the weight: sum_k |W[n, k]| step / 508
    # (the int8 products are summed exactly in int32); fp32 rounding of the scaling on top, far below it
    want = Q.quant_linear_reference(x.double(), ref_layer.qweight, ref_layer.scales, None, None, ref_layer.bias)
    W = Q.dequantize(ref_layer.qweight, ref_layer.scales).double()
    step = x.double().abs().amax(1, keepdim=True) / 127
    bound = step * W.abs().sum(1) / (2 * Q.X_DIGIT) + 1e-6 * want.abs()
    assert y.dtype == torch.float32 and ((y.double() - want).abs() <= bound).all()
    # one-digit x (step / 2 per value) would be 254x the bound: the test tells them apart
    assert (y.double() - want).abs().max() < (step * W.abs().sum(1)).min() / 2 / 20
    assert torch.equal(ql(x[-1:]), y[-1:])  # each row alone gets the same numbers: sums are exact, steps per row
    assert ql(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="int8 codes packed for the CPU kernel cannot be saved"):
        ql.state_dict()


def test_int8_without_onednn_keeps_pytorchs_weight_only_kernel_and_says_so(monkeypatch, capsys):
    monkeypatch.setattr(Q, "onednn_int8_problem", lambda: "is not available in this torch build (test)")
    Q._say_once.cache_clear()
    _, ql = layer(96, 64, 8)
    codes = ql.qweight.clone()
    ql.pack_for_cpu()
    ql.pack_for_cpu()
    assert not ql.cpu_packed and torch.equal(ql.qweight, codes)
    assert capsys.readouterr().err.count("int8 layers: oneDNN's int8 matmul is not available in this torch build "
                                         "(test); they run torch._weight_int8pack_mm") == 1
    x = torch.randn(2, 64)
    bf16_close(ql(x), reference(x.bfloat16().float(), ql))


@pytest.mark.parametrize("bits,G", [(8, None), (4, 32)])
def test_concat_joins_layers_reading_one_x_and_refuses_what_it_cannot_join(bits, G):
    parts = [layer(n, 64, bits, G, seed=n)[1] for n in (32, 16, 48)]
    joined = Q.QuantLinear.concat(parts)
    assert (joined.in_features, joined.out_features, joined.parts) == (64, 96, [32, 16, 48])
    assert "parts=[32, 16, 48]" in repr(joined)
    x = torch.randn(5, 64)
    torch.testing.assert_close(joined(x), torch.cat([p(x) for p in parts], dim=-1), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="QuantLinear: 3 layers joined for inference .* cannot be saved"):
        joined.state_dict()
    with pytest.raises(ValueError, match=r"layer 1 \(QuantLinear\(in_features=128, .*\)\) differs from layer 0 \(Q"):
        Q.QuantLinear.concat([parts[0], layer(32, 128, bits, G)[1]])
    with pytest.raises(ValueError, match="layer 1 .* has a bias"):
        Q.QuantLinear.concat([parts[0], layer(32, 64, bits, G, bias=True)[1]])
    with pytest.raises(ValueError, match="layer 0 .* is packed for the CPU already"):
        Q.QuantLinear.concat([layer(32, 64, 4, 32)[1].pack_for_cpu(), parts[0]])  # int4 packs on any CPU


@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("M", [1, 3, 9])
def test_int4_packed_for_the_cpu_equals_the_reference(G, M):
    _, ql = layer(96, 256, 4, G)
    ref_layer = Q.QuantLinear(256, 96, 4, G)
    for name in ("qweight", "scales", "offsets"):
        setattr(ref_layer, name, getattr(ql, name).clone())
    ql.pack_for_cpu()
    assert ql.cpu_packed and ql.scales is None  # the portable codes are not kept twice
    x = torch.randn(M, 256)
    bf16_close(ql(x), reference(x.bfloat16().float(), ref_layer))
    with pytest.raises(RuntimeError, match="cannot be saved"):
        ql.state_dict()


def packed_int4(N, K, G):
    """(a layer packed for the CPU, its portable twin) with the same codes."""
    _, ql = layer(N, K, 4, G)
    portable = Q.QuantLinear(K, N, 4, G)
    for name in ("qweight", "scales", "offsets"):
        setattr(portable, name, getattr(ql, name).clone())
    return ql.pack_for_cpu(), portable


def cpu_tile() -> int:
    """The tile width int4_cpu_tile must find on the CPUs whose layouts minillava reads (others: the test skips)."""
    want = {"AVX512": 64, "AVX2": 32}.get(torch.backends.cpu.get_cpu_capability())
    if want is None:
        pytest.skip(f"PyTorch's int4 CPU layout for {torch.backends.cpu.get_cpu_capability()} is not one minillava "
                    "reads (its prefill keeps the kernel)")
    assert Q.int4_cpu_tile() == want
    return want


@pytest.mark.parametrize("G", [32, 64, 128])
def test_int4_cpu_layout_reads_back_to_the_same_numbers(G):
    tile = cpu_tile()
    packed, portable = packed_int4(192, 256, G)  # 3 tiles of 64, 6 of 32
    want = Q.dequantize(portable.qweight, portable.scales, portable.offsets, G)
    got = Q.dequantize_int4_cpu(packed.qweight, packed.scales_and_zeros, G, tile)
    assert torch.equal(got, want)
    other = Q.dequantize_int4_cpu(packed.qweight, packed.scales_and_zeros, G, 96 - tile)  # the other tile width
    assert (other - want).abs().max() > 0.1  # a wrong layout gives other numbers: the comparison can fail


def test_int4_cpu_layout_follows_the_cpus_kernels():
    """PyTorch picks the layout by the kernels it dispatches (ATEN_CPU_CAPABILITY): AVX2's is read too."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("a CPU without AVX2")
    code = ("import torch; import minillava.kernels.quant as Q; t = Q.int4_cpu_tile(); W = torch.randn(96, 128); "
            "q = Q.quantize(W, 4, 32); p, sz = Q.pack_int4_for_cpu(q['qweight'], q['scales'], q['offsets']); "
            "print(torch.backends.cpu.get_cpu_capability(), t, torch.equal(Q.dequantize_int4_cpu(p, sz, 32, t), "
            "Q.dequantize(q['qweight'], q['scales'], q['offsets'], 32)))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["AVX2", "32", "True"]


@pytest.mark.parametrize("G", [32, 128])
def test_int4_prefill_rows_run_a_bf16_gemm_on_dequantized_blocks(G, monkeypatch):
    cpu_tile()
    calls = []
    read_back = Q.dequantize_int4_cpu
    monkeypatch.setattr(Q, "dequantize_int4_cpu", lambda *a: (calls.append(a[0].shape[0]), read_back(*a))[1])
    monkeypatch.setattr(Q, "BLOCK_ROWS", 128)  # two blocks: 128 and 64 output channels
    N, K = 192, 256
    packed, portable = packed_int4(N, K, G)
    W = Q.dequantize(portable.qweight, portable.scales, portable.offsets, G).double()
    for M in (Q.DEQUANT_ROWS - 1, Q.DEQUANT_ROWS, 130):
        calls.clear()
        x = torch.randn(M, K)
        y = packed(x).double()
        assert calls == ([128, 64] if M >= Q.DEQUANT_ROWS else []), M
        xb = x.bfloat16().double()  # both paths take x in bf16
        want, size = xb @ W.t(), xb.abs() @ W.abs().t()
        # each weight rounded to bf16 (2^-8 of it), fp32 sums over K, the output rounded to bf16 (2^-8 of it)
        bound = (2 ** -8 + K * 2 ** -24) * size * (1 + 2 ** -8) + 2 ** -8 * want.abs()
        assert ((y - want).abs() <= bound).all(), M


def test_int4_prefill_keeps_the_kernel_where_the_layout_is_unknown_or_the_width_is_not_whole_tiles(monkeypatch,
                                                                                                   capsys):
    monkeypatch.setattr(Q, "dequantize_int4_cpu", lambda *a: pytest.fail("dequantized"))
    x = torch.randn(Q.DEQUANT_ROWS, 256)
    packed, portable = packed_int4(96 + 16, 256, 32)  # not whole tiles of 32 or 64
    bf16_close(packed(x), reference(x.bfloat16().float(), portable))
    monkeypatch.setattr(Q, "int4_cpu_tile", lambda: None)
    Q._say_once.cache_clear()
    packed, portable = packed_int4(128, 256, 32)
    bf16_close(packed(x), reference(x.bfloat16().float(), portable))
    bf16_close(packed(x), reference(x.bfloat16().float(), portable))
    assert capsys.readouterr().err.count("int4 prefill: PyTorch's int4 CPU layout here is not one minillava reads; "
                                         "prefill runs its decoding kernel (slower)") == 1


# Triton, in the interpreter: decode and prefill row counts, N and K not multiples of the blocks (int8)
TRITON_CASES = [(1, 100, 256), (3, 70, 40), (37, 64, 128)]


@pytest.mark.parametrize("bits, G", [(8, None), (4, 32), (4, 128)])
@pytest.mark.parametrize("M, N, K", TRITON_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernel_equals_the_reference(bits, G, M, N, K, dtype, monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU kernel tests need TRITON_INTERPRET=1")
    if bits == 4 and K % G:
        K = G * 2
    monkeypatch.setenv("MINILLAVA_KERNELS", "force")
    calls = []
    launch = Q._triton_linear
    monkeypatch.setattr(Q, "_triton_linear", lambda *a: (calls.append(1), launch(*a))[1])
    _, ql = layer(N, K, bits, G, bias=True)
    x = torch.randn(M, K).to(dtype)
    y = ql(x)
    assert calls == [1] and y.dtype == dtype
    truth = reference(x.double(), ql)  # fp64 on the same inputs
    # fp32: only the order of the additions; fp16: x, the output (and an int4 weight) each rounded once to fp16
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(y.double(), truth, rtol=tol, atol=tol * truth.abs().max().item())


# ----------------------------------------------------------------------------------------------------------
# Whole models: quantized while loading, quantized checkpoints
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    return {"A": write_random_checkpoint(root / "A", TINY, "A", seed=0),
            "B": write_random_checkpoint(root / "B", TINY, "B", seed=0), "root": root}


def batch(model, seed=0):
    img = model.config.image_token_id
    ids = torch.tensor([[1, 5, img, 6, 7, 8, 9, 10], [1, 11, 12, img, 13, 14, 15, 16]])
    pix = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return ids, pix


@torch.no_grad()
def logits(model):
    return model(*batch(model), torch.ones(2, 8, dtype=torch.long))


def dequantized_copy(model):
    """The quantized model with every QuantLinear replaced by an nn.Linear holding its dequantized weight."""
    import copy
    dense = copy.deepcopy(model)
    for name, m in list(dense.named_modules()):
        if isinstance(m, Q.QuantLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data = Q.dequantize(m.qweight, m.scales, m.offsets, m.group_size)
            if m.bias is not None:
                lin.bias.data = m.bias
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent), child, lin)
    return dense


@pytest.mark.parametrize("q", SETTINGS, ids=str)
def test_quantized_while_loading_matches_its_dequantized_reference_and_the_fp32_model(ckpt, q, monkeypatch):
    import copy
    dense = load_llava(ckpt["A"]["model"])
    model = load_llava(ckpt["A"]["model"], quantize=q)  # on the CPU: joined and packed (L.prepare_for_cpu)
    with monkeypatch.context() as m:
        m.setattr(L, "prepare_for_cpu", lambda model, dense=False: None)
        portable = load_llava(ckpt["A"]["model"], quantize=q)
    names = wq.targets(dense)
    assert len(names) == 2 * 7 + 1 and all(isinstance(portable.get_submodule(n), Q.QuantLinear) for n in names)
    assert model.quantization == q
    assert isinstance(model.vision_tower.vision_model.encoder.layers[0].mlp.fc1, nn.Linear)  # the tower stays
    # the quantized codes are those of quantizing the dense weights directly
    for n in names:
        want = Q.quantize(dense.get_submodule(n).weight, q.bits, q.group_size)
        got = portable.get_submodule(n)
        assert torch.equal(got.qweight, want["qweight"]) and torch.equal(got.scales, want["scales"]), n
    # q, k, v and gate, up joined; each joined layer gives its parts' outputs side by side, through the same kernel
    packs = q.bits == 4 or Q.onednn_int8_problem() is None
    for i, layer in enumerate(model.language_model.model.layers):
        attn, mlp = portable.language_model.model.layers[i].self_attn, portable.language_model.model.layers[i].mlp
        for joined, parts in ((layer.self_attn.qkv_proj, [attn.q_proj, attn.k_proj, attn.v_proj]),
                              (layer.mlp.gate_up_proj, [mlp.gate_proj, mlp.up_proj])):
            assert joined.parts == [p.out_features for p in parts] and joined.cpu_packed == packs
            x = torch.randn(3, joined.in_features)
            want = torch.cat([copy.deepcopy(p).pack_for_cpu()(x) for p in parts], dim=-1)
            assert torch.equal(joined(x), want), (i, joined.parts)
        assert not hasattr(layer.self_attn, "q_proj") and not hasattr(layer.mlp, "up_proj")  # not kept twice
    a, b = logits(dense), logits(model)
    # against fp32: the quantization error itself, relative to the logits' spread (measured on this random model:
    # int8 max 0.050 / mean 0.009, all 46 greedy tokens the same; int4 mean 0.11, 74% of them the same: its
    # logits are close together, so a small error flips a token). A wrong code, scale or nibble order is ~1.
    err = (a - b).abs() / a.std()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    if q.bits == 8:
        assert err.max() < 0.1 and err.mean() < 0.02 and agree >= 0.95, (err.max(), err.mean(), agree)
    else:
        assert err.mean() < 0.2 and agree >= 0.6, (err.mean(), agree)


@pytest.mark.parametrize("q,onednn", [(Quantization(8), True), (Quantization(8), False), (Quantization(4, 32), True)],
                         ids=["int8", "int8, oneDNN missing", "int4"])
def test_joined_layers_give_the_same_logits_as_the_layers_one_by_one(ckpt, q, onednn, monkeypatch):
    """The joined model's forward (q, k, v split back for grouped-query attention: 4 heads, 2 key/value heads;
    gate and up) against the same quantized layers called one by one through the same kernels: equal, since
    each output channel's sum is computed the same way in either."""
    from minillava.llama import LlamaAttention, LlamaMLP
    if not onednn:  # the int8 layers stay unpacked: PyTorch's weight-only kernel, joined or not
        monkeypatch.setattr(Q, "onednn_int8_problem", lambda: "is not available in this torch build (test)")
    joined = load_llava(ckpt["A"]["model"], quantize=q)
    with monkeypatch.context() as m:
        m.setattr(LlamaAttention, "join", lambda self, dense: None)
        m.setattr(LlamaMLP, "join", lambda self, dense: None)
        separate = load_llava(ckpt["A"]["model"], quantize=q)
    a, b = joined.language_model.model.layers[0], separate.language_model.model.layers[0]
    assert a.self_attn.qkv_proj.parts == [64, 32, 32] and b.self_attn.qkv_proj is None
    assert a.mlp.gate_up_proj.cpu_packed == (onednn or q.bits == 4) and b.mlp.gate_up_proj is None
    torch.testing.assert_close(logits(joined), logits(separate), atol=0, rtol=0)


def test_a_compiled_decode_step_runs_the_int8_layers_and_gives_the_same_answers(ckpt):
    """Engine(compile=True) with int8 layers packed for oneDNN (~40 s here): inductor calls the int8 matmul as it
    is (kernels/quant.py's opaque op; its own lowering failed on a module's packed weight) and fuses the rest;
    greedy ids equal the eager engine's."""
    from minillava.engine import Engine, Request
    model = load_llava(ckpt["A"]["model"], quantize=Quantization(8))
    if not model.language_model.model.layers[0].mlp.gate_up_proj.cpu_packed:
        pytest.skip("oneDNN's int8 matmul is not usable here: the layers keep PyTorch's weight-only kernel")
    ids, pix = batch(model)
    reqs = lambda: [Request(ids[i].tolist(), pix[i:i + 1], max_new_tokens=8) for i in range(2)]
    compiled = Engine(model, slots=2, max_seq_len=32, compile=True)
    got = [r.out for r in compiled.run(reqs())]
    assert got == [r.out for r in Engine(model, slots=2, max_seq_len=32).run(reqs())]
    assert compiled.stats.compile_s > 0


def test_int8_model_equals_its_dequantized_reference(ckpt, monkeypatch):
    monkeypatch.setattr(L, "prepare_for_cpu", lambda model, dense=False: None)  # the portable codes, to copy them
    model = load_llava(ckpt["A"]["model"], quantize=Quantization(8))
    torch.testing.assert_close(logits(model), logits(dequantized_copy(model)), atol=1e-4, rtol=1e-4)


def run_quantize(src, out, *args):
    return subprocess.run([sys.executable, str(ROOT / "quantize.py"), str(src), str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("layout", ["A", "B"])
@pytest.mark.parametrize("q", SETTINGS, ids=str)
def test_quantized_checkpoint_loads_with_no_requantization(ckpt, layout, q, monkeypatch):
    paths = ckpt[layout]
    out = ckpt["root"] / f"q-{layout}-{q.bits}"
    args = ["--bits", str(q.bits)] + (["--group-size", str(q.group_size)] if q.group_size else []) + (
        ["--vision", paths["vision"]] if "vision" in paths else [])
    r = run_quantize(paths["model"], out, *args)
    assert r.returncode == 0, r.stderr
    assert f"{q}" in r.stdout and "layers" in r.stderr  # the result and the progress
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == "llava" and hf[QUANT_KEY]["bits"] == q.bits
    assert hf[QUANT_KEY]["group_size"] == q.group_size
    tensors = load_file(out / "model.safetensors")
    assert "language_model.model.layers.0.mlp.down_proj.qweight" in tensors
    assert "language_model.model.layers.0.mlp.down_proj.weight" not in tensors
    on_load = load_llava(paths["model"], vision_path=paths.get("vision"), quantize=q)
    monkeypatch.setattr(Q, "quantize", lambda *a: pytest.fail("a quantized checkpoint was quantized again"))
    loaded = load_llava(out)
    assert loaded.quantization == q
    V = on_load.config.text.vocab_size  # layout B's -200 sentinel: the saved vocabulary gains <image>, <pad> rows
    torch.testing.assert_close(logits(loaded)[..., :V], logits(on_load), atol=0, rtol=0)


def test_saving_an_int8_model_round_trips(ckpt, tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match=r"layers\.0\.self_attn\.(qkv|o)_proj: .* cannot be saved"):
        save_llava(load_llava(ckpt["A"]["model"], quantize=Quantization(8)), tmp_path / "joined")
    assert not (tmp_path / "joined").exists()  # nothing half-written
    monkeypatch.setattr(L, "prepare_for_cpu", lambda model, dense=False: None)  # the layers as the checkpoint names them
    model = load_llava(ckpt["A"]["model"], quantize=Quantization(8))
    save_llava(model, tmp_path / "s")
    back = load_llava(tmp_path / "s")
    torch.testing.assert_close(logits(back), logits(model), atol=0, rtol=0)


def test_training_refuses_a_quantized_checkpoint(q4):
    from minillava import train
    with pytest.raises(ValueError, match=r"--model .*q4-errors is quantized \(int4.*train from the dense checkpoint"):
        train.load_model(train.TrainConfig(model=str(q4)))


@pytest.fixture(scope="module")
def q4(ckpt):
    out = ckpt["root"] / "q4-errors"
    assert run_quantize(ckpt["A"]["model"], out, "--bits", "4", "--group-size", "32").returncode == 0
    return out


def damaged(src: Path, dst: Path, tensors=None, config=None) -> Path:
    import shutil
    shutil.copytree(src, dst)
    if tensors:
        t = load_file(dst / "model.safetensors")
        tensors(t)
        save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    if config:
        d = json.loads((dst / "config.json").read_text())
        config(d)
        (dst / "config.json").write_text(json.dumps(d))
    return dst


KEY = "language_model.model.layers.1.mlp.up_proj"


def test_a_quantized_checkpoint_into_another_shape_is_a_named_error(q4, tmp_path):
    bad = damaged(q4, tmp_path / "shape", config=lambda d: d["text_config"].update(intermediate_size=128))
    with pytest.raises(CheckpointError, match=r"tensor language_model.model.layers.0.mlp.up_proj.qweight in .*: "
                                              r"expected shape \(128, 32\), "
                                              r"found \(96, 32\)"):
        load_llava(bad)


@pytest.mark.parametrize("value, what", [(float("nan"), "not finite"), (-1.0, "negative")])
def test_a_corrupt_scale_tensor_is_a_named_error(q4, tmp_path, value, what):
    def edit(t):
        t[f"{KEY}.scales"][3, 1] = value
    bad = damaged(q4, tmp_path / "scale", tensors=edit)
    with pytest.raises(CheckpointError, match=rf"corrupt scale tensor {KEY}.scales in .*model.safetensors: 1 of "
                                              rf"\d+ values are .*{what}"):
        load_llava(bad)


def test_wrong_dtypes_and_settings_are_named_errors(q4, ckpt, tmp_path):
    def as_float(t):
        t[f"{KEY}.qweight"] = t[f"{KEY}.qweight"].float()
    with pytest.raises(CheckpointError, match=rf"tensor {KEY}.qweight .* has dtype torch.float32, expected "
                                              r"torch.uint8"):
        load_llava(damaged(q4, tmp_path / "dtype", tensors=as_float))
    bad = damaged(q4, tmp_path / "bits", config=lambda d: d[QUANT_KEY].update(bits=3))
    with pytest.raises(CheckpointError, match=f"{QUANT_KEY} .* is not a valid quantization"):
        load_llava(bad)
    with pytest.raises(CheckpointError, match="already quantized"):
        load_llava(q4, quantize=Quantization(8))
    with pytest.raises(CheckpointError, match=r"language_model.model.layers.0.mlp.down_proj: int4 groups of 64 "
                                              r"do not divide its 96 input features"):
        load_llava(ckpt["A"]["model"], quantize=Quantization(4, 64))
    r = run_quantize(q4, tmp_path / "twice", "--bits", "8")
    assert r.returncode != 0 and "already quantized" in r.stderr and not (tmp_path / "twice").exists()


# ----------------------------------------------------------------------------------------------------------
# The scripts, and bf16 on the CPU
def test_generate_quantizes_while_loading_and_reads_quantized_checkpoints(tmp_path):
    import dataclasses
    from PIL import Image
    from tests.spm_util import train_tiny_spm
    cfg = TINY.replace(text=dataclasses.replace(TINY.text, vocab_size=832), image_token_id=768, pad_token_id=769)
    tok = train_tiny_spm(tmp_path / "spm")  # 768 pieces, as tests/test_generate.py's model
    dense = write_random_checkpoint(tmp_path / "dense", cfg, "A", seed=1, tokenizer=tok)["model"]
    assert run_quantize(dense, tmp_path / "q4", "--bits", "4", "--group-size", "32").returncode == 0
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (200, 20, 20)).save(image)
    for model, extra, shown in ((dense, ["--quantize", "int8"], "float32, LLM linear layers int8 (per channel)"),
                                (tmp_path / "q4", [], "float32, LLM linear layers int4 (groups of 32)"),
                                (dense, ["--dtype", "bf16"], "bfloat16"),
                                (dense, ["--dtype", "bf16", "--quantize", "int4", "--group-size", "32"],
                                 "bfloat16, LLM linear layers int4 (groups of 32)")):
        r = subprocess.run([sys.executable, "generate.py", "--model", str(model), "--image", str(image), "--prompt",
                            "What is it?", "--temperature", "0", "--max-new-tokens", "4", *extra],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert f"GB, {shown}" in r.stderr and "decode: 3 tokens" in r.stderr  # + 1 from prefill


def test_bf16_on_the_cpu_is_close_to_fp32(ckpt):
    a = logits(load_llava(ckpt["A"]["model"]))
    model = load_llava(ckpt["A"]["model"], dtype=torch.bfloat16)
    assert model.language_model.model.embed_tokens.weight.dtype == torch.bfloat16
    b = logits(model)
    assert b.dtype == torch.bfloat16
    err = (a - b.float()).abs() / a.std()  # measured: max 0.056, mean well below (every op rounds to bf16)
    assert err.max() < 0.1 and err.mean() < 0.02, (err.max(), err.mean())


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs CUDA and compiled Triton (TRITON_INTERPRET=0)")
@pytest.mark.parametrize("bits, G", [(8, None), (4, 64)])
@pytest.mark.parametrize("M", [1, 8, 100])
def test_gpu_kernel_at_7b_shapes_in_bf16(bits, G, M, monkeypatch):
    monkeypatch.setenv("MINILLAVA_KERNELS", "1")
    lin = nn.Linear(4096, 11008, bias=False, device="cuda", dtype=torch.bfloat16)
    ql = Q.QuantLinear.from_float(lin, bits, G)
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    truth = reference(x.double(), ql)
    # bf16: x, the output (and an int4 weight) each rounded once to bf16; fp32 accumulation over K = 4096
    torch.testing.assert_close(ql(x).double(), truth, rtol=2 ** -6, atol=2 ** -6 * truth.abs().max().item())
