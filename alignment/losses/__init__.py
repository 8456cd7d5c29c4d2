"""Loss math for SFT, reward modelling, the preference family (DPO and its variants, BCO, KTO, ORPO,
SimPO, CPO, mDPO), PPO and GRPO: plain tensors in, tensors out; torch only.

Shapes: B batch, T tokens, V vocabulary. ``mask`` is 1 on the tokens that count, 0 elsewhere.
Log-probs are natural log.
"""

from .bco import bco_pair_loss
from .dpo import (
    DPO_LOSS_TYPES,
    apo_down_loss,
    apo_zero_loss,
    dpo_loss,
    dpo_sigmoid_loss,
    hinge_loss,
    ipo_loss,
    rpo_nll,
)
from .grpo import (
    GROUP_ADVANTAGES,
    IMPORTANCE_SAMPLING,
    LOSS_AGGREGATIONS,
    group_advantages,
    grpo_loss,
    grpo_loss_sum,
)
from .kl import AdaptiveKLController, FixedKLController
from .kto import kto_loss
from .logprobs import entropy_from_logits, gather_logprobs, logprobs_at, sequence_logprobs
from .masked import masked_mean, masked_sum, masked_var, masked_whiten
from .mdpo import mdpo_loss
from .ppo import (
    gae_advantages,
    kl_penalized_rewards,
    last_counted_index,
    ppo_policy_loss,
    ppo_policy_loss_sum,
    ppo_value_loss,
    ppo_value_loss_sum,
)
from .reference_free import cpo_loss, orpo_loss, simpo_loss
from .reward import bradley_terry_loss, reward_centering_loss
from .sft import sft_loss, sft_loss_sum

__all__ = [
    "DPO_LOSS_TYPES",
    "GROUP_ADVANTAGES",
    "IMPORTANCE_SAMPLING",
    "LOSS_AGGREGATIONS",
    "AdaptiveKLController",
    "FixedKLController",
    "apo_down_loss",
    "apo_zero_loss",
    "bco_pair_loss",
    "bradley_terry_loss",
    "cpo_loss",
    "dpo_loss",
    "dpo_sigmoid_loss",
    "entropy_from_logits",
    "gae_advantages",
    "gather_logprobs",
    "logprobs_at",
    "group_advantages",
    "grpo_loss",
    "grpo_loss_sum",
    "hinge_loss",
    "ipo_loss",
    "kl_penalized_rewards",
    "kto_loss",
    "last_counted_index",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "mdpo_loss",
    "orpo_loss",
    "ppo_policy_loss",
    "ppo_policy_loss_sum",
    "ppo_value_loss",
    "ppo_value_loss_sum",
    "reward_centering_loss",
    "rpo_nll",
    "sequence_logprobs",
    "simpo_loss",
    "sft_loss",
    "sft_loss_sum",
]
