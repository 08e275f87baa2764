"""kernels/linear.py: the CPU decoding path (a batched GEMM over blocks of W's rows) equals F.linear, and is taken
only where it measured faster."""
import time
import types

import pytest
import torch
import torch.nn.functional as F

import minillava.kernels.linear as L


@pytest.fixture
def batched(monkeypatch):
    monkeypatch.setattr(L, "MODE", "batched")  # the batched GEMM wherever it applies, whatever this CPU prefers


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
    """MODE auto: the first call of a shape times both paths and keeps the batched GEMM only when it is MARGIN
    faster; later calls of that shape reuse the verdict, other row counts are measured apart."""
    monkeypatch.setattr(L, "FASTER", {})
    slow = {"f": None}
    real_bmm = torch.bmm

    def bmm(*a):  # the batched GEMM, made slow or not
        if slow["f"] == "batched":
            time.sleep(0.002)
        return real_bmm(*a)

    def f_linear(*a):
        if slow["f"] == "f.linear":
            time.sleep(0.002)
        return F.linear(*a)

    monkeypatch.setattr(L.torch, "bmm", bmm)
    monkeypatch.setattr(L, "F", types.SimpleNamespace(linear=f_linear))
    w, threads = torch.randn(64, 16), torch.get_num_threads()
    slow["f"] = "batched"
    y = L.linear(torch.randn(1, 16), w)
    assert L.FASTER[(64, 16, torch.float32, 1, threads)][0] is False
    slow["f"] = "f.linear"
    L.linear(torch.randn(1, 16), w)  # the verdict stays: no new measurement
    assert len(L.FASTER) == 1
    y = L.linear(torch.randn(3, 16), w)  # another row count: measured, and now the batched GEMM wins
    assert L.FASTER[(64, 16, torch.float32, 3, threads)][0] is True and y.shape == (3, 64)
    assert "64 x 16 float32, 3 row(s)" in L.describe() and "batched GEMM" in L.describe()
