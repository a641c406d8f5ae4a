"""The distillation loss (LinFusion / GSPN recipe), each term weighted:

- noise: MSE of the student's noise prediction against the training target
  (the added noise, or v for v-prediction models) -- only with real images;
- output: MSE between student and teacher predictions;
- feature: mean over layers of the MSE between each GSPN layer's output and
  the output of the self-attention it replaces (both from one forward each).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_features: List[torch.Tensor],
    teacher_features: List[torch.Tensor],
    weights: Dict[str, float],
    noise_pred: Optional[torch.Tensor] = None,
    target: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """The weighted terms and their sum under ``"loss"`` (computed in fp32)."""
    if len(student_features) != len(teacher_features) or not student_features:
        raise RuntimeError(
            f"recorded {len(student_features)} GSPN and {len(teacher_features)} attention outputs; "
            "each replaced layer must run once per forward"
        )
    terms = {
        "output": F.mse_loss(student.float(), teacher.float()),
        "feature": torch.stack(
            [F.mse_loss(s.float(), t.float()) for s, t in zip(student_features, teacher_features)]
        ).mean(),
    }
    if noise_pred is not None and target is not None:
        terms["noise"] = F.mse_loss(noise_pred.float(), target.float())
    terms["loss"] = sum(weights.get(name, 0.0) * value for name, value in terms.items())
    return terms
