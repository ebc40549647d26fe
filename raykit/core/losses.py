"""Training losses: group softmax cross-entropy and the teacher-score KL term."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_softmax_loss(logits: torch.Tensor, group_size: int) -> torch.Tensor:
    """Cross-entropy over each group with the positive at index 0."""
    scores = logits.float().view(-1, group_size)
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores, target)


def distillation_loss(
    logits: torch.Tensor, teacher_scores: torch.Tensor, group_size: int, temperature: float
) -> torch.Tensor:
    """KL(teacher || student) over each group's softmax at `temperature`, scaled by T^2."""
    student = F.log_softmax(logits.float().view(-1, group_size) / temperature, dim=-1)
    teacher = F.softmax(teacher_scores.float().view(-1, group_size) / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean") * temperature**2
