"""kernels/linear.py: the CPU decoding paths (a batched GEMM over blocks of W's rows, torch.mv) equal F.linear, and
are taken only where they measured faster."""
import time
import types

import pytest
import torch
import torch.nn.functional as F

import minillava.kernels.linear as L


@pytest.fixture
def batched(monkeypatch):
    monkeypatch.setattr(L, "MODE", "batched GEMM")  # the batched GEMM wherever it applies, whatever this CPU prefers


@pytest.mark.parametrize("lead", [(1,), (3,), (4, 1), (2, 2), (1, 1, 1), (5,), (2, 7)])
@pytest.mark.parametrize("N, bias", [(96, False), (38, True), (37, False)])
def test_linear_equals_f_linear(batched, lead, N, bias):
    g = torch.Generator().manual_seed(0)
    K = 53
    x = torch.randn(*lead, K, generator=g)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    y = L.linear(x, w, b)
    assert y.shape == (*lead, N)
    # fp32 accumulation in both; only MKL's order of additions differs
    torch.testing.assert_close(y, F.linear(x, w, b), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mv_equals_f_linear_for_one_row(monkeypatch, dtype):
    monkeypatch.setattr(L, "MODE", "torch.mv")
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(1, 1, 300, generator=g).to(dtype), torch.randn(96, 300, generator=g).to(dtype)
    calls = []
    mv = torch.mv
    monkeypatch.setattr(L.torch, "mv", lambda *a: (calls.append(a[0].shape), mv(*a))[1])
    y = L.linear(x, w)
    assert calls == [(96, 300)] and y.shape == (1, 1, 96) and y.dtype == dtype
    # both accumulate in fp32; bf16 rounds the output once (2^-8 relative), fp32 differs in the order of additions
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2 ** -8 * 20, rtol=2 ** -8)
    torch.testing.assert_close(y, F.linear(x, w), **tol)
    L.linear(torch.randn(2, 300).to(dtype), w)  # two rows: not torch.mv's
    assert len(calls) == 1


def test_fast_path_runs_for_decoding_rows_only(batched, monkeypatch):
    calls = []
    bmm = torch.bmm
    monkeypatch.setattr(L.torch, "bmm", lambda *a: (calls.append(a[0].shape), bmm(*a))[1])
    w = torch.randn(64, 16)
    L.linear(torch.randn(2, 1, 16), w)  # two sequences, one token each: the blocked path
    assert calls == [(L.CHUNKS, 64 // L.CHUNKS, 16)]
    L.linear(torch.randn(1, L.MAX_ROWS + 1, 16), w)  # a prompt: F.linear
    L.linear(torch.randn(1, 16), w.t().contiguous().t())  # a strided weight: F.linear
    L.linear(torch.randn(1, 16, dtype=torch.float64), w.double()[:63])  # N not divisible: F.linear
    assert len(calls) == 1


def test_gradients_flow_through_the_fast_path(batched):
    x = torch.randn(1, 16, requires_grad=True)
    w = torch.randn(64, 16, requires_grad=True)
    gx, gw = torch.autograd.grad(L.linear(x, w).square().sum(), (x, w))
    rx, rw = torch.autograd.grad(F.linear(x, w).square().sum(), (x, w))
    torch.testing.assert_close(gx, rx, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gw, rw, atol=1e-4, rtol=1e-5)


def test_auto_takes_the_path_that_measured_faster(monkeypatch):
    """MODE auto: the first calls of a shape take turns among the paths, TRIALS timed calls each, and return
    F.linear's product meanwhile; the verdict keeps another path than F.linear only when it is MARGIN faster;
    later calls of that shape reuse it, other row counts are measured apart."""
    monkeypatch.setattr(L, "FASTER", {})
    monkeypatch.setattr(L, "TIMES", {})
    slow, ran = {"f": set()}, []
    SLOW = 0.02  # s added to a slowed path: far beyond any other call's time, even on a loaded machine (CI)
    real_bmm, real_mv = torch.bmm, torch.mv

    def bmm(*a):  # the batched GEMM, made slow or not
        ran.append("batched GEMM")
        if "batched" in slow["f"]:
            time.sleep(SLOW)
        return real_bmm(*a)

    def mv(*a):
        ran.append("torch.mv")
        if "mv" in slow["f"]:
            time.sleep(SLOW)
        return real_mv(*a)

    def f_linear(*a):
        ran.append("F.linear")
        if "f.linear" in slow["f"]:
            time.sleep(SLOW)
        return F.linear(*a)

    def measure(x, w):
        """Calls until the shape's verdict; each call returns F.linear's product exactly."""
        for call in range(len(L.PATHS) * L.TRIALS):
            assert (*w.shape, w.dtype, x.shape[0], threads) not in L.FASTER
            assert torch.equal(L.linear(x, w), F.linear(x, w))
            if call + 1 < len(L.PATHS) * L.TRIALS:
                assert f"measuring ({call + 1} of {len(L.PATHS) * L.TRIALS} timings)" in L.describe()
        return L.FASTER[(*w.shape, w.dtype, x.shape[0], threads)]

    monkeypatch.setattr(L.torch, "bmm", bmm)
    monkeypatch.setattr(L.torch, "mv", mv)
    monkeypatch.setattr(L, "F", types.SimpleNamespace(linear=f_linear))
    g = torch.Generator().manual_seed(2)
    w, threads = torch.randn(64, 16, generator=g), torch.get_num_threads()
    x1, x3 = torch.randn(1, 16, generator=g), torch.randn(3, 16, generator=g)
    slow["f"] = {"batched", "mv"}
    used, best = measure(x1, w)
    assert used == "F.linear" and set(best) == set(L.PATHS)
    # each path timed TRIALS times; after each of the others, F.linear's product
    assert sorted(ran) == sorted(["F.linear"] * len(L.PATHS) * L.TRIALS + ["batched GEMM", "torch.mv"] * L.TRIALS)
    slow["f"], ran[:] = {"f.linear"}, []
    L.linear(x1, w)  # the verdict stays: no new measurement
    assert len(L.FASTER) == 1 and ran == ["F.linear"]
    slow["f"] = {"f.linear", "mv"}
    for call in range(2 * L.TRIALS):  # another row count: measured apart, no torch.mv (one row only)
        assert torch.equal(L.linear(x3, w), F.linear(x3, w))
    used, best = L.FASTER[(64, 16, torch.float32, 3, threads)]
    assert used == "batched GEMM" and "torch.mv" not in best
    torch.testing.assert_close(L.linear(x3, w), F.linear(x3, w), atol=2e-5, rtol=1e-5)  # now the batched GEMM's
    slow["f"] = {"f.linear", "batched"}
    used, _ = measure(x1.double(), w.double())  # and here torch.mv
    assert used == "torch.mv"
    assert "64 x 16 float32, 3 row(s)" in L.describe() and "batched GEMM" in L.describe()


@pytest.mark.parametrize("mode, rows, dtype", [("torch.mv", 1, torch.float32), ("batched GEMM", 3, torch.bfloat16)])
def test_compiled_code_takes_the_chosen_path_through_one_opaque_op(monkeypatch, mode, rows, dtype):
    """torch.compile does not trace into the choice (inductor would rewrite torch.mv): the compiled function runs
    the path chosen for the shape at run time, and gives the eager answer, of its shape and dtype."""
    monkeypatch.setattr(L, "MODE", mode)
    calls = []
    name = {"torch.mv": "mv", "batched GEMM": "bmm"}[mode]
    real = getattr(torch, name)
    monkeypatch.setattr(L.torch, name, lambda *a: (calls.append(a[0].shape), real(*a))[1])
    g = torch.Generator().manual_seed(3)
    x, w, b = (torch.randn(rows, 1, 48, generator=g).to(dtype), torch.randn(32, 48, generator=g).to(dtype),
               torch.randn(32, generator=g).to(dtype))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, w, b: L.linear(x, w, b).relu(), fullgraph=True)
    with torch.no_grad():
        y = compiled(x, w, b)
        calls.clear()
        y = compiled(x, w, b)
    assert len(calls) == 1  # torch.mv or bmm itself, at run time
    assert y.shape == (rows, 1, 32) and y.dtype == dtype
    # fp32 sums in both; bf16 rounds the product once more before the bias (2^-8 relative)
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2 ** -8 * 20, rtol=2 ** -7)
    torch.testing.assert_close(y, (F.linear(x, w) + b).relu(), **tol)
    w.requires_grad_(True)  # a product that needs its gradient: F.linear, traced as usual
    calls.clear()
    gw, = torch.autograd.grad(compiled(x, w, b).sum(), (w,))
    assert calls == []
    torch.testing.assert_close(gw, torch.autograd.grad((F.linear(x, w) + b).relu().sum(), (w,))[0], **tol)


def test_concat_views_adjacent_weights_and_joins_no_others():
    """DecodeLinear.concat: weights lying back to back in one storage, in order, become one view of it (no copy);
    any others give no layer; the joined layer's output is its parts' side by side; it refuses layers it cannot
    join and cannot be saved."""
    block = torch.randn(12, 8)
    parts = [L.DecodeLinear(8, n, bias=False) for n in (6, 4, 2)]
    for p, w in zip(parts, block.split([6, 4, 2])):
        p.weight = torch.nn.Parameter(w)
    joined = L.DecodeLinear.concat(parts)
    assert joined.parts == [6, 4, 2] and joined.weight.data_ptr() == block.data_ptr()
    assert torch.equal(joined.weight, block)
    x = torch.randn(3, 8)
    torch.testing.assert_close(joined(x), torch.cat([p(x) for p in parts], dim=-1), atol=1e-6, rtol=1e-6)
    assert L.DecodeLinear.concat([parts[1], parts[0]]) is None  # out of order: no view, and no copy
    apart = L.DecodeLinear(8, 4, bias=False)  # a weight of its own storage
    assert L.DecodeLinear.concat([parts[0], apart]) is None
    with pytest.raises(RuntimeError, match="joined for inference"):
        joined.state_dict()
    for bad in (torch.nn.Linear(8, 4, bias=False), L.DecodeLinear(8, 4, bias=True), L.DecodeLinear(6, 4, bias=False),
                joined):
        with pytest.raises(ValueError, match="DecodeLinear.concat: layer 1"):
            L.DecodeLinear.concat([parts[0], bad])
