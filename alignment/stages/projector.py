"""`ProjectorStage`: LLaVA's first phase (seed 002) - train only the multi-modal projector.

Everything else stays frozen: the vision tower, the language model and every adapter. For
Mllama the projector is `multi_modal_projector` plus the cross-attention gates (the tanh gates
that let image information into the text stream); for LLaVA it is `multi_modal_projector`; for Qwen
the vision merger (`PROJECTOR_PATTERNS` of each family file). The
loss is SFT's (completion NLL), through the shared loop of `Stage`. The trained weights are saved
in the stage folder as base weights (`peft_type: BASE_WEIGHTS`); the next stage loads them into the
base (frozen) and starts its own adapter on top, and every adapter saved afterwards carries them
(`base_weights.safetensors`), so a resumed run or `eval` of a later stage sees the same base.
"""

from __future__ import annotations

from pathlib import Path

from alignment.policy import LoraSpec
from alignment.stages.common import PROJECTOR_ADAPTER, is_base_weights_folder
from alignment.stages.reward import only_train
from alignment.stages.sft import SFTStage


class ProjectorStage(SFTStage):
    """SFT's loss, collation and evaluation; only the projector trains."""

    type = "projector"
    adapter_name = PROJECTOR_ADAPTER

    def setup(self, previous_adapter):
        policy, source = self.policy, self.config.init_adapter or previous_adapter
        if PROJECTOR_ADAPTER not in policy.adapters:
            if source is not None and is_base_weights_folder(Path(source)):  # an earlier projector stage's
                policy.load_adapter(PROJECTOR_ADAPTER, source, trainable=True)
            else:
                # the family's full-match regexes over base parameter names (PEFT's `.base_layer` removed)
                policy.add_adapter(PROJECTOR_ADAPTER, LoraSpec(method="base_weights",
                                                               target_modules=policy.family.PROJECTOR_PATTERNS))
        only_train(policy, {PROJECTOR_ADAPTER})
        policy.set_adapter(PROJECTOR_ADAPTER)
        names = policy.own["base_weights"].configs[PROJECTOR_ADAPTER]["parameters"]
        print(f"[{self.config.name}] projector: {len(names)} tensors, "
              f"{sum(p.numel() for p in policy.trainable_parameters()):,} trainable parameters "
              f"({', '.join(names[:3])}{' ...' if len(names) > 3 else ''})")
