"""The softened KL divergence that KD and channel-wise distillation share."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def softened_kl(student: Tensor, teacher: Tensor, temperature: float, dim: int) -> Tensor:
    r""":math:`T^2\,\mathrm{KL}(\sigma(t / T) \,\|\, \sigma(s / T))` along ``dim``.

    The :math:`T^2` keeps gradient magnitudes comparable across temperatures
    (Hinton et al., 2015). Computed from log-probabilities, so it stays finite
    where a probability underflows to zero.
    """
    log_p_s = F.log_softmax(student / temperature, dim=dim)
    log_p_t = F.log_softmax(teacher / temperature, dim=dim)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim) * temperature**2
