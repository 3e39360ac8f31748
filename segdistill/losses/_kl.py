"""The softened KL divergence that KD and channel-wise distillation share."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def softened_kl(student: Tensor, teacher: Tensor, temperature: float, dim: int) -> Tensor:
    r""":math:`T^2\,\mathrm{KL}(\sigma(t / T) \,\|\, \sigma(s / T))` along ``dim``.

    The :math:`T^2` keeps gradient magnitudes comparable across temperatures
    (Hinton et al., 2015). Computed from log-probabilities, so it stays finite
    where a probability underflows to zero. A class the teacher gives zero
    probability (a ``-inf`` logit: a masked class) adds :math:`0 \log 0 = 0`,
    with a zero gradient, instead of NaN; a NaN or a ``+inf`` logit still gives NaN.
    """
    log_p_s = F.log_softmax(student / temperature, dim=dim)
    log_p_t = F.log_softmax(teacher / temperature, dim=dim)
    p_t = log_p_t.exp()
    # Where p_t == 0 both logs may be -inf: the term is 0, and the where's other
    # branch must stay finite so that its (masked) gradient is not NaN.
    masked = p_t == 0
    zeros = torch.zeros_like(log_p_t)
    terms = p_t * (torch.where(masked, zeros, log_p_t) - torch.where(masked, zeros, log_p_s))
    return terms.sum(dim) * temperature**2
