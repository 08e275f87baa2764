"""Sampling: the next id from the logits, greedy or with temperature, top-k and top-p (nucleus).

The generation loop that calls it is the decode engine, minillava/engine.py.
"""
import torch


def check_settings(temperature=0.0, top_k=None, top_p=None):
    """The one check of the sampling settings (a Request runs it when it is made, `sample` before it draws)."""
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"need temperature >= 0, top_k >= 1, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next ids (B,).

    temperature 0: argmax (greedy). Otherwise p = softmax(logits / temperature), restricted to the top_k most
    likely ids, then to the nucleus (the smallest set of most likely ids whose mass reaches top_p), renormalised,
    and one id is drawn with `generator` (seeded: reproducible). Same order as Hugging Face: temperature,
    top-k, top-p.
    """
    check_settings(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature  # (B, V)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # (B, V) mass of the strictly more likely ids; 0 for the first
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = logits.scatter(-1, order, sorted_logits)  # back to vocabulary order
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)  # (B,)
