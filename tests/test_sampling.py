"""sampling.py: the sampler's support and reproducibility (the decode loop that calls it: test_engine.py)."""
import pytest
import torch

from minillava.sampling import sample


# --- sample() ---------------------------------------------------------------------------------------------
def support(logits, n=4000, **kw):
    """The set of ids drawn in n draws from one row of logits, and their frequencies."""
    g = torch.Generator().manual_seed(0)
    draws = sample(logits.expand(n, -1), generator=g, **kw)  # (n,)
    counts = torch.bincount(draws, minlength=logits.shape[-1]).float() / n
    return set(draws.tolist()), counts


P = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04])  # sorted, boundaries away from the tested top_p values
LOGITS = P.log()[None]  # (1, V)


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 50)
    assert torch.equal(sample(logits, temperature=0.0), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=0.0, top_k=3, top_p=0.5), logits.argmax(-1))


def test_top_k_keeps_exactly_the_k_most_likely():
    for k in (1, 2, 4):
        ids, _ = support(LOGITS, temperature=1.0, top_k=k)
        assert ids == set(range(k))


@pytest.mark.parametrize("top_p, expected", [(0.3, 1), (0.6, 2), (0.75, 3), (0.85, 4), (0.97, 6), (1.0, 6)])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
    ids, _ = support(LOGITS, temperature=1.0, top_p=top_p)
    assert ids == set(range(expected))


def test_top_k_then_top_p_on_the_renormalised_rest():
    # top_k=2 leaves (0.4, 0.25) -> renormalised (0.615, 0.385): top_p=0.6 then keeps only id 0,
    # whereas top_p=0.6 alone keeps ids 0 and 1 (0.4 < 0.6).
    assert support(LOGITS, temperature=1.0, top_k=2, top_p=0.6)[0] == {0}
    assert support(LOGITS, temperature=1.0, top_p=0.6)[0] == {0, 1}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_frequencies_follow_softmax_over_temperature(temperature):
    _, freq = support(LOGITS, n=20000, temperature=temperature)
    expected = torch.softmax(LOGITS[0] / temperature, -1)
    # 20000 draws: the standard error of each frequency is <= 0.0036; 0.015 is > 4 of them.
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_nucleus_is_renormalised_in_proportion():
    _, freq = support(LOGITS, n=20000, temperature=1.0, top_p=0.75)  # nucleus {0, 1, 2}
    torch.testing.assert_close(freq[:3], P[:3] / P[:3].sum(), atol=0.015, rtol=0)
    assert freq[3:].sum() == 0


def test_same_seed_same_tokens():
    logits = torch.randn(3, 100)
    draw = lambda s: sample(logits, 1.0, 20, 0.9, torch.Generator().manual_seed(s))
    assert torch.equal(draw(7), draw(7))
    assert any(not torch.equal(draw(7), draw(s)) for s in range(8, 12))


def test_bad_sampling_arguments_are_errors():
    for kw in (dict(temperature=-1.0), dict(temperature=1.0, top_k=0), dict(temperature=1.0, top_p=0.0),
               dict(temperature=1.0, top_p=1.5)):
        with pytest.raises(ValueError, match="need temperature"):
            sample(LOGITS, **kw)
