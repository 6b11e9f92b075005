"""Knowledge distillation from the uncompressed model: the usual way to recover accuracy after compression
and the only one when the original labels are gone (language models on unlabelled text).

    loss = (1 - alpha) * task_loss + alpha * distillation_loss(student(x), teacher(x), temperature=T)
"""
from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

from .errors import ConfigError


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) of the temperature-softened distributions, times T² (Hinton et al. 2015), so its
    gradient scale does not depend on T. Logits are (..., C); leading dims (batch, tokens) are averaged.

    Example: student (32, 10), teacher (32, 10) -> scalar; LM logits (4, 128, 49152) -> scalar (mean per token).
    The teacher side carries no gradient.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() < 1:
        raise ConfigError(f"distillation_loss wants student and teacher logits of one shape (..., classes), got "
                          f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    t = float(temperature)
    if not t > 0:
        raise ConfigError(f"distillation_loss got temperature={temperature!r}: allowed is a float > 0")
    c = student_logits.shape[-1]
    log_p = F.log_softmax(student_logits.reshape(-1, c).float() / t, dim=1)
    log_q = F.log_softmax(teacher_logits.detach().reshape(-1, c).float() / t, dim=1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * (t * t)
