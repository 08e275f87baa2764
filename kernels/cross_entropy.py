"""Cross-entropy of logits against labels, skipping ignore_index, computed in fp32.
logits (N, V) in any float dtype, labels (N,) int64 -> scalar (sum or mean over the kept rows)."""
import torch
import torch.nn.functional as F

import kernels


def cross_entropy_reference(logits, labels, ignore_index: int = -100, reduction: str = "mean"):
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction=reduction)


def cross_entropy(logits, labels, ignore_index: int = -100, reduction: str = "mean"):
    return cross_entropy_reference(logits, labels, ignore_index, reduction)
