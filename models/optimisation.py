"""What teacher and refiner training share: AdamW with a poly(0.9) schedule, and one optimiser step."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def poly_adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
               total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW whose learning rate decays as ``(1 - step / total_steps) ** 0.9``."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(1.0 - s / total_steps, 0.0) ** 0.9)
    return optimizer, schedule


def apply_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
               schedule: torch.optim.lr_scheduler.LRScheduler) -> float:
    """Backpropagate ``loss``, step the optimiser and the schedule; returns the loss value."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    return float(loss.detach())
