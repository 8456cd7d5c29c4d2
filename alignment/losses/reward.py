"""Reward-model loss: the Bradley-Terry pairwise likelihood.

P(chosen preferred over rejected) = sigmoid(r_c - r_r); training maximises its log.
"""

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Mean over pairs of ``-log sigmoid(r_c - r_r - margin)``: a scalar, in nats.

    Args:
        chosen_rewards, rejected_rewards: ``[B]`` scalar rewards of each pair's two responses.
        margin: ``[B]`` or a number, the reward gap a pair must exceed (Llama-2 style);
            ``None`` means 0.

    Uses ``-logsigmoid``, which stays finite for any gap (about ``-gap`` when it is very negative).
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def reward_centering_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of ``(r_c + r_r) ** 2``: a scalar, in squared reward units.

    The Bradley-Terry loss sees only ``r_c - r_r``, so a reward model may add any per-prompt offset;
    this auxiliary term (Eisenstein et al. 2023, "Helping or Herding?"; TRL's
    ``center_rewards_coefficient``) pulls each pair's mean reward to 0, so rewards of different
    prompts share one scale.

    Args:
        chosen_rewards, rejected_rewards: ``[B]`` scalar rewards of each pair's two responses.
    """
    return (chosen_rewards + rejected_rewards).pow(2).mean()
