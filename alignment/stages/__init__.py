"""Training stages: one shared loop (`Stage`) and a thin subclass per method."""

from alignment.stages.base import NonFiniteLossError, RunContext, Stage
from alignment.stages.dpo import DPOStage
from alignment.stages.sft import SFTStage

STAGES: dict[str, type[Stage]] = {"sft": SFTStage, "dpo": DPOStage}

__all__ = ["STAGES", "DPOStage", "NonFiniteLossError", "RunContext", "SFTStage", "Stage"]
