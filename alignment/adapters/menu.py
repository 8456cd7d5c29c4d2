"""The PEFT menu (seeds 001 and 004): which method builds which adapter, and on which base.

| method        | what trains                                  | built by                       | 4-bit base |
| ------------- | -------------------------------------------- | ------------------------------ | ---------- |
| lora          | A [r, in], B [out, r] per targeted linear     | peft `LoraConfig`              | yes        |
| qlora         | lora on the 4-bit NF4 base (needs 4bit)       | peft `LoraConfig`              | required   |
| dora          | lora + a magnitude vector [out] per linear    | peft `LoraConfig(use_dora)`    | yes        |
| ia3           | a scaling vector per linear (in for MLPs)     | peft `IA3Config`               | yes        |
| loha          | Hadamard product of two low-rank pairs        | peft `LoHaConfig`              | no (*)     |
| lora_fa       | lora with A frozen at its random init: B only | peft `LoraConfig` + freezing A | yes        |
| bitfit        | the biases                                    | `adapters.bitfit`              | yes        |
| prompt_tuning | n virtual-token embeddings [n, hidden]        | peft `PromptEmbedding` + hooks | yes        |
| bottleneck    | seed 003's Bottleneck Adapter (+ visual)      | `adapters.bottleneck`          | yes        |
| prefix_tuning | n key/value pairs per self-attention layer    | peft `PrefixEncoder` + hooks   | yes        |
| tinytl        | a lite residual MLP per block + the biases    | `adapters.tinytl`              | yes        |
| bitdelta      | 1-bit signs + one scale per linear (**)      | `vlm-align compress`           | yes        |
| full          | the base's weights (text decoder), in place  | `adapters.full`                | no         |

(*) PEFT's LoHa wraps a bitsandbytes `Linear4bit` (a `nn.Linear` subclass) but builds its update
from the packed 4-bit weight's shape, and the forward fails (`mat1 and mat2 shapes cannot be
multiplied (4x192 and 1x18432)` on tiny-mllama): a recipe with it on a 4-bit base is refused.

(**) BitDelta compresses a trained stage's delta (`alignment/bitdelta.py`, `adapters.bitdelta`): made by
`vlm-align compress RUN_DIR/STAGE`, loaded and served like the others; a stage does not train one.

`full` is full-parameter fine-tuning (the memory-lean optimizers `lomo` / `mezo` of seed 001 are the
stage's `optimizer:`); a quantised base stores weights that cannot be trained in full.

LoRA-FA here freezes A, as the seed describes; PEFT's `LoraFAOptimizer` additionally projects
B's gradient, which needs an optimizer swap the shared loop does not make.
"""

from __future__ import annotations

import re

from alignment.errors import ConfigError
from alignment.presets import METHODS, OWN_METHODS, PEFT_METHODS

__all__ = ["METHODS", "OWN_METHODS", "PEFT_METHODS", "check_method", "check_recipe", "peft_config"]
NOT_ON_4BIT = {"loha": "PEFT's LoHa cannot wrap bitsandbytes 4-bit layers",
               "full": "full fine-tuning updates the base weights, which a quantised base cannot train"}
NOT_TRAINED = {"bitdelta": "bitdelta is not trained by a stage: train with lora (or another method), then "
                            "`vlm-align compress RUN_DIR/STAGE` makes the 1-bit delta"}
NEEDS_4BIT = {"qlora": "qlora is LoRA on the 4-bit base"}
# Which PEFT parameter names belong to a tuner, and to which adapter: `.lora_A.policy.weight`,
# `.lora_magnitude_vector.policy.weight`, `.ia3_l.policy`, `.hada_w1_a.policy`.
TUNER_PARAM = re.compile(r"\.(lora_\w+|ia3_\w+|hada_\w+)\.([^.]+)(\.|$)")


def check_method(method: str, quantization: str, where: str = "lora.method") -> None:
    """`ConfigError` naming `where` when `method` cannot run with `model.quantization`."""
    if method not in METHODS:
        raise ConfigError(f"{where}: unknown method {method!r}; valid: {list(METHODS)}")
    if quantization != "none" and method in NOT_ON_4BIT:
        raise ConfigError(f"{where}: {method} cannot run on the {quantization} base ({NOT_ON_4BIT[method]}); "
                          "set model.quantization: none")
    if quantization != "4bit" and method in NEEDS_4BIT:
        raise ConfigError(f"{where}: {NEEDS_4BIT[method]}; set model.quantization: 4bit (or use method lora)")


def peft_config(spec, targets: list[str]):
    """The PEFT config of a `LoraSpec` whose method is one of `PEFT_METHODS`."""
    from peft import IA3Config, LoHaConfig, LoraConfig

    if spec.method in ("lora", "qlora", "lora_fa", "dora"):
        return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                          bias="none", use_dora=spec.method == "dora")
    if spec.method == "ia3":
        # (IA)^3 scales the input of feed-forward layers and the output of the others.
        feedforward = [t for t in targets if re.search(r"mlp\.(down_proj|fc2)$|linear_2$", t)]
        return IA3Config(target_modules=targets, feedforward_modules=feedforward)
    if spec.method == "loha":
        return LoHaConfig(r=spec.r, alpha=spec.alpha, rank_dropout=0.0, module_dropout=0.0, target_modules=targets)
    raise ValueError(f"{spec.method!r} is not a PEFT method ({PEFT_METHODS})")


def own_adapters_class(method: str):
    """The `OwnAdapters` subclass of a method PEFT does not provide."""
    from alignment.adapters.base_weights import BaseWeights
    from alignment.adapters.bitdelta import BitDeltaAdapters
    from alignment.adapters.bitfit import BitFitAdapters
    from alignment.adapters.bottleneck import BottleneckAdapters
    from alignment.adapters.full import FullAdapters
    from alignment.adapters.prefix import PrefixAdapters
    from alignment.adapters.prompt import PromptAdapters
    from alignment.adapters.tinytl import TinyTLAdapters

    classes = {"bitfit": BitFitAdapters, "prompt_tuning": PromptAdapters, "bottleneck": BottleneckAdapters,
               "prefix_tuning": PrefixAdapters, "tinytl": TinyTLAdapters,
               "base_weights": BaseWeights, "bitdelta": BitDeltaAdapters, "full": FullAdapters}
    return classes[method]


def method_of_peft_type(peft_type: str) -> str | None:
    """The own method a saved `peft_type` names (None: a PEFT adapter)."""
    return {"BITFIT": "bitfit", "VLM_PROMPT_TUNING": "prompt_tuning", "BOTTLENECK": "bottleneck",
            "VLM_PREFIX_TUNING": "prefix_tuning", "TINYTL": "tinytl",
            "BASE_WEIGHTS": "base_weights", "BITDELTA": "bitdelta", "FULL": "full"}.get(peft_type)


def check_recipe(recipe) -> None:
    """Recipe-level checks of adapters: each stage's method against `model.quantization`, and a
    `projector` stage only at the start (before the stages whose adapters it sits under)."""
    seen_other = False
    for i, stage in enumerate(recipe.stages):
        lora = getattr(stage, "lora", None)
        if lora is not None:
            check_method(lora.method, recipe.model.quantization, f"stages.{i}.lora.method")
            if lora.method in NOT_TRAINED:
                raise ConfigError(f"stages.{i}.lora.method: {NOT_TRAINED[lora.method]}")
        if stage.type == "projector" and seen_other:
            raise ConfigError(f"stages.{i}: a projector stage must come before the other stages (LLaVA's order: "
                              "projector, then sft)")
        seen_other |= stage.type != "projector"
