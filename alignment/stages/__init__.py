"""Training stages: one shared loop (`Stage`) and a thin subclass per method."""

from alignment.stages.base import NonFiniteLossError, RunContext, Stage
from alignment.stages.dpo import DPOStage
from alignment.stages.grpo import GRPOStage
from alignment.stages.ppo import PPOStage
from alignment.stages.projector import ProjectorStage
from alignment.stages.reward import RewardModelStage
from alignment.stages.sft import SFTStage

STAGES: dict[str, type[Stage]] = {"sft": SFTStage, "dpo": DPOStage, "reward": RewardModelStage, "ppo": PPOStage,
                                  "grpo": GRPOStage, "projector": ProjectorStage}

__all__ = ["STAGES", "DPOStage", "GRPOStage", "NonFiniteLossError", "PPOStage", "ProjectorStage", "RewardModelStage",
           "RunContext", "SFTStage", "Stage"]
