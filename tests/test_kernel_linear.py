"""kernels/linear.py: the CPU decoding path (a batched GEMM over blocks of W's rows) equals F.linear."""
import pytest
import torch
import torch.nn.functional as F

import minillava.kernels.linear as L


@pytest.mark.parametrize("lead", [(1,), (3,), (4, 1), (2, 2), (1, 1, 1), (5,), (2, 7)])
@pytest.mark.parametrize("N, bias", [(96, False), (38, True), (37, False)])
def test_linear_equals_f_linear(lead, N, bias):
    g = torch.Generator().manual_seed(0)
    K = 53
    x = torch.randn(*lead, K, generator=g)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    y = L.linear(x, w, b)
    assert y.shape == (*lead, N)
    # fp32 accumulation in both; only MKL's order of additions differs
    torch.testing.assert_close(y, F.linear(x, w, b), atol=2e-5, rtol=1e-5)


def test_fast_path_runs_for_decoding_rows_only(monkeypatch):
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


def test_gradients_flow_through_the_fast_path():
    x = torch.randn(1, 16, requires_grad=True)
    w = torch.randn(64, 16, requires_grad=True)
    gx, gw = torch.autograd.grad(L.linear(x, w).square().sum(), (x, w))
    rx, rw = torch.autograd.grad(F.linear(x, w).square().sum(), (x, w))
    torch.testing.assert_close(gx, rx, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gw, rw, atol=1e-4, rtol=1e-5)
