"""Typed recipe configuration: one dataclass per section, a doc line per field, checks in
`__post_init__`. `alignment.recipe` builds these from YAML and rejects unknown keys."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from alignment.errors import ConfigError  # also imported from here by callers
from alignment.presets import METHODS, PAIR_LOSSES, PEFT_METHODS, PRESETS, loss_names, needs_reference

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "4bit", "8bit")
SCHEDULES = ("cosine", "linear", "constant")
ON_ERROR = ("error", "skip")
REPORT_TO = ("tensorboard", "wandb", "trackio", "none")


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(value is None or value > 0, name, f"must be > 0, got {value!r}")


@dataclass
class ModelConfig:
    """The base model every stage shares."""

    name: str = "tiny-mllama"  # built-in tiny name, local folder, or hub id
    quantization: str = "4bit"  # none | 4bit (NF4, double quant) | 8bit (not Mllama)
    dtype: str = "auto"  # compute dtype: auto = bfloat16 on GPU, float32 on CPU
    gradient_checkpointing: bool = False  # trade compute for activation memory
    trust_remote_code: bool = False  # never run a checkpoint's own code unless set
    min_pixels: int | None = None  # Qwen-VL: each image's resized area at least this (pixels); None: the processor's
    max_pixels: int | None = None  # Qwen-VL: at most this; image tokens = area / 28**2 (Qwen3-VL: 32**2)
    chat_template: str | None = None  # Jinja chat template file used in place of the checkpoint's (one rendering image parts); None: its own

    def __post_init__(self):
        _check(self.quantization in QUANTIZATIONS, "model.quantization", f"must be one of {QUANTIZATIONS}")
        _check(self.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}")
        for key in ("min_pixels", "max_pixels"):
            value = getattr(self, key)
            _check(value is None or (isinstance(value, int) and value > 0), f"model.{key}", "must be a positive integer")
        _check(self.min_pixels is None or self.max_pixels is None or self.min_pixels <= self.max_pixels,
               "model.min_pixels", f"must not exceed model.max_pixels ({self.max_pixels})")
        _check(self.chat_template is None or Path(self.chat_template).expanduser().is_file(), "model.chat_template",
               f"no such file: {self.chat_template} (a Jinja chat template, e.g. the base model's chat_template.jinja)")


@dataclass
class LoraConfig:
    """PEFT settings of the trained adapters (a stage's `lora:` block): LoRA by default, or another
    method of the PEFT menu (`alignment/adapters/menu.py`) picked by `method`."""

    method: str = "lora"  # lora | qlora | dora | ia3 | loha | lora_fa | bitfit | prompt_tuning | bottleneck | prefix_tuning | tinytl | full
    r: int = 16  # rank (lora, qlora, dora, loha, lora_fa)
    alpha: int = 32  # scaling numerator (scale = alpha / r)
    dropout: float = 0.0  # dropout on the adapter's input (lora family, bottleneck)
    preset: str = "language"  # where: language | cross_attention | vision | multimodal | all
    target_modules: list[str] | str | None = None  # PEFT methods, in place of the preset: module names (a linear whose name is one or ends with `.name`, e.g. [q_proj, v_proj]) or one regex over full names, as PEFT takes them
    lm_head: bool = False  # lora family: also a LoRA on the output head (lets a frozen head grow confident)
    dim: int = 16  # bottleneck: adapter dimension d (seed 003's best: 16); tinytl: branch width; prefix MLP width
    groups: int = 2  # bottleneck: groups k of the up-projection (seed 003's best: 2); tinytl: norm groups; divides dim
    scale: float = 1.0  # bottleneck: fixed scale of the adapter's output
    visual_dim: int | None = None  # bottleneck: SwiGLU visual adapter width d_v in place of the projector (None: off)
    num_virtual_tokens: int = 8  # prompt_tuning: trainable prompt length; prefix_tuning: prefix length
    prefix_projection: bool = False  # prefix_tuning: the prefix through PEFT's reparameterisation MLP (width dim)

    def __post_init__(self):
        _positive(self, "r", "alpha", "dim", "groups", "visual_dim", "num_virtual_tokens")
        _check(self.method in METHODS, "lora.method", f"must be one of {list(METHODS)}, got {self.method!r}")
        _check(0 <= self.dropout < 1, "lora.dropout", "must be in [0, 1)")
        _check(self.preset in PRESETS, "lora.preset", f"must be one of {PRESETS}")
        _check(self.dim % self.groups == 0, "lora.groups", f"must divide lora.dim ({self.dim}), got {self.groups}")
        if self.target_modules is not None:
            _check(self.method in PEFT_METHODS, "lora.target_modules",
                   f"applies to the PEFT methods {list(PEFT_METHODS)}; {self.method} places itself by lora.preset")
            _check(bool(self.target_modules), "lora.target_modules", "must name at least one module (or leave it out)")
            if isinstance(self.target_modules, str):
                try:
                    re.compile(self.target_modules)
                except re.error as error:
                    raise ConfigError(f"lora.target_modules: not a valid regex ({error})") from None


SELECT_BY = ("diversity", "random")


@dataclass
class SelectConfig:
    """Data pruning (seed 002): keep k training examples, chosen by greedy k-center on the policy's own
    pooled image+text embeddings, images first, every category at least once."""

    k: int = 1000  # examples kept
    by: str = "diversity"  # diversity (greedy k-center) | random (the control)
    prefer_images: bool = True  # pick examples that show an image before text-only ones
    category_field: str | None = None  # field every value of which is covered once (None: category, else kind)
    batch_size: int = 32  # examples per embedding forward

    def __post_init__(self):
        _positive(self, "k", "batch_size")
        _check(self.by in SELECT_BY, "data.select.by", f"must be one of {SELECT_BY}, got {self.by!r}")


@dataclass
class DataConfig:
    """Where examples come from and how they are checked."""

    source: str = "synthetic_bookcover"  # synthetic_bookcover, a local file/folder, or a hub dataset
    path: str | None = None  # alias for source when it is a local path
    format: str | None = None  # ocrvqa | messages | preference | rlaifv | scienceqa; detected when unset
    num_covers: int = 700  # synthetic covers to generate
    image_size: int = 112  # synthetic covers' width in px (and height, unless image_height is set)
    image_height: int | None = None  # synthetic covers' height in px (e.g. 900 for OCR-VQA-like 600x900 portraits)
    seed: int = 0  # data generation and pairing seed
    eval_fraction: float = 0.15  # held-out covers when the source has no eval split
    max_train_examples: int | None = None  # cap on training examples (None: all)
    max_eval_examples: int | None = 200  # cap on held-out examples
    instruction: str | None = None  # prompt instruction; None = seed 000's
    max_length: int = 256  # prompt + answer tokens; longer rows are errors or skips
    on_error: str = "error"  # error | skip: what a bad row does
    sft_verbose_fraction: float = 0.1  # share of SFT answers that explain (by question phrasing, as raw data does)
    sft_verbose_rate: float = 1.0  # of those phrasings' answers, the share that explain (< 1: both answers learnt)
    sft_verbose_style: str = "any"  # any | answer_first: explaining templates that start with the concise answer
    verbose_fraction: float = 0.5  # share of rejected answers that are verbose (rest: wrong)
    off_kind_fraction: float = 0.0  # share of wrong rejections answering another kind of question (training pairs)
    select: SelectConfig | None = None  # keep only k training examples (seed 002's pruning); None: all

    def __post_init__(self):
        if self.path is not None:
            self.source = self.path
        _positive(self, "num_covers", "image_size", "image_height", "max_length", "max_train_examples",
                  "max_eval_examples")
        _check(0 <= self.eval_fraction < 1, "data.eval_fraction", "must be in [0, 1)")
        _check(self.on_error in ON_ERROR, "data.on_error", f"must be one of {ON_ERROR}")
        for name in ("sft_verbose_fraction", "sft_verbose_rate", "verbose_fraction", "off_kind_fraction"):
            _check(0 <= getattr(self, name) <= 1, f"data.{name}", "must be in [0, 1]")
        from alignment.data.catalog import VERBOSE_STYLES

        _check(self.sft_verbose_style in VERBOSE_STYLES, "data.sft_verbose_style",
               f"must be one of {tuple(VERBOSE_STYLES)}")


@dataclass
class StageConfig:
    """Settings every stage shares: the loop, the optimizer, checkpoints, evaluation."""

    name: str = ""  # folder name of the stage's outputs; defaults to its type
    type: str = ""  # sft | dpo | reward | ppo | grpo | projector
    max_steps: int = 100  # optimizer steps
    batch_size: int = 16  # examples (pairs for dpo/reward) per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate
    lr_schedule: str = "cosine"  # cosine | linear | constant, after warmup
    warmup_steps: int = 0  # linear warmup steps
    min_lr_ratio: float = 0.1  # final lr as a fraction of the peak (cosine, linear)
    weight_decay: float = 0.0  # decoupled weight decay (AdamW's; LOMO and MeZO apply it alike)
    max_grad_norm: float | None = 1.0  # gradient clipping; None disables it (lomo: a second pass; mezo: ignored)
    optimizer: str = "adamw"  # adamw | lomo (SGD fused into backward, no state) | mezo (two no-grad forwards a step)
    mezo_eps: float = 1e-3  # mezo: perturbation scale eps of the two-point gradient estimate
    log_every: int = 5  # steps between logged scalars
    save_every: int = 50  # steps between checkpoints
    keep_checkpoints: int = 2  # newest complete checkpoints kept
    max_nonfinite_steps: int = 3  # consecutive non-finite steps before the run stops
    eval_examples: int = 200  # held-out examples evaluated after training
    eval_batch_size: int = 32  # examples per evaluation batch
    max_new_tokens: int = 24  # generation budget in evaluation
    init_adapter: str | None = None  # adapter folder to start from (default: the previous stage's)

    def __post_init__(self):
        if not self.name:
            self.name = self.type
        _positive(self, "max_steps", "batch_size", "grad_accum", "lr", "log_every", "save_every",
                  "keep_checkpoints", "max_nonfinite_steps", "eval_batch_size", "max_new_tokens")
        _check(self.lr_schedule in SCHEDULES, f"stages.{self.name}.lr_schedule", f"must be one of {SCHEDULES}")
        _check(self.warmup_steps >= 0, f"stages.{self.name}.warmup_steps", "must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, f"stages.{self.name}.min_lr_ratio", "must be in [0, 1]")
        _check(self.eval_examples >= 0, f"stages.{self.name}.eval_examples", "must be >= 0")
        from alignment.optimizers import OPTIMIZERS

        _check(self.optimizer in OPTIMIZERS, f"stages.{self.name}.optimizer",
               f"must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        _check(self.mezo_eps > 0, f"stages.{self.name}.mezo_eps", f"must be > 0, got {self.mezo_eps!r}")


@dataclass
class SFTConfig(StageConfig):
    """Supervised fine-tuning on completions (seed 000)."""

    type: str = "sft"
    lora: LoraConfig = field(default_factory=LoraConfig)  # the `policy` adapter
    blind_control: bool = True  # also evaluate with every image blanked


@dataclass
class DPOConfig(StageConfig):
    """Direct preference optimisation against a frozen reference (or, for orpo, simpo, cpo, none)."""

    type: str = "dpo"
    lr: float = 5e-4
    beta: float = 0.1  # strength of the implicit KL to the reference; every loss_type's beta (simpo: 2.0 recommended)
    loss_type: str | list[str] = "sigmoid"  # sigmoid | ipo | hinge | apo_zero | apo_down | bco_pair (reference); orpo | simpo | cpo | sft (reference-free); or a list, e.g. [sigmoid, bco_pair, sft] (MPO)
    loss_weights: list[float] | None = None  # with a list loss_type: one weight per loss (MPO: [0.8, 0.2, 1.0]); None: all 1
    simpo_gamma: float = 0.5  # simpo: the target reward margin gamma (simpo wants beta about 2.0, not DPO's 0.1)
    label_smoothing: float = 0.0  # conservative DPO's epsilon (sigmoid only)
    rpo_alpha: float = 0.0  # weight of the chosen answers' per-token NLL added to the loss (RPO; 0: plain DPO)
    precompute_ref_logprobs: bool = False  # one reference pass before training (over the batches training will see)
    disable_dropout: bool = True  # dropout (LoRA's too) off for the stage, as TRL does: step 0's log-ratio is exactly 0
    share_prefix: bool = True  # each pair one row: image + prompt through the language model once (Mllama, LLaVA, Qwen-VL)
    lora: LoraConfig = field(default_factory=LoraConfig)  # used when no adapter is inherited

    def __post_init__(self):
        super().__post_init__()
        where = f"stages.{self.name}"
        _positive(self, "beta")
        names = loss_names(self.loss_type)
        _check(bool(names), f"{where}.loss_type", "an empty list; name at least one loss type")
        for name in names:
            _check(name in PAIR_LOSSES, f"{where}.loss_type", f"unknown loss type {name!r}; valid: {sorted(PAIR_LOSSES)}")
        if self.loss_weights is not None:
            _check(not isinstance(self.loss_type, str), f"{where}.loss_weights",
                   f"weights a list loss_type (e.g. [sigmoid, bco_pair, sft]); loss_type is the single {self.loss_type!r}: "
                   "remove loss_weights or make loss_type a list")
            _check(len(self.loss_weights) == len(names), f"{where}.loss_weights",
                   f"{len(self.loss_weights)} weight(s) for the {len(names)} loss types {names}; give one weight per loss type")
            for name, weight in zip(names, self.loss_weights):
                _check(weight >= 0, f"{where}.loss_weights", f"must be >= 0, got {weight!r} (for {name})")
        _check(not self.precompute_ref_logprobs or needs_reference(self.loss_type), f"{where}.precompute_ref_logprobs",
               f"loss_type {self.loss_type} is reference-free: there is no reference to precompute; remove the key")
        _check(0 <= self.label_smoothing < 0.5, f"{where}.label_smoothing", "must be in [0, 0.5)")
        _check(self.label_smoothing == 0 or "sigmoid" in names, f"{where}.label_smoothing",
               f"applies to the sigmoid loss only, and loss_type is {self.loss_type}")
        _check(self.rpo_alpha >= 0, f"{where}.rpo_alpha", "must be >= 0")


STAGE_CONFIGS: dict[str, type[StageConfig]] = {"sft": SFTConfig, "dpo": DPOConfig}


@dataclass
class ProjectorConfig(StageConfig):
    """LLaVA's first phase (seed 002): only the multi-modal projector (Mllama: and the cross-attention
    gates) trains, on SFT's loss; chain it before `sft`. Its weights stay in the base afterwards."""

    type: str = "projector"
    lr: float = 1e-3  # seed 002's projector learning rate
    blind_control: bool = True  # also evaluate with every image blanked


STAGE_CONFIGS["projector"] = ProjectorConfig


@dataclass
class RewardConfig(StageConfig):
    """A reward model: a scalar head on the last token, Bradley-Terry loss on preference pairs (seed 004)."""

    type: str = "reward"
    margin: float | None = None  # Bradley-Terry margin every pair must exceed (None: 0)
    center_rewards: float = 0.0  # weight of mean((r_c + r_r)^2): one reward scale across prompts (TRL's 0.01)
    init_from_previous: bool = True  # start the `reward` adapter from the previous stage's (SFT's) LoRA weights
    share_prefix: bool = True  # each pair one row: image + prompt through the language model once (Mllama, LLaVA, Qwen-VL)
    lora: LoraConfig = field(default_factory=LoraConfig)  # the `reward` adapter when it starts fresh

    def __post_init__(self):
        super().__post_init__()
        _check(self.center_rewards >= 0, f"stages.{self.name}.center_rewards", "must be >= 0")


CRITIC_INITS = ("reward", "fresh")


@dataclass
class PPOConfig(StageConfig):
    """PPO with a critic and GAE against a KL-penalised reward (seed 004).

    One optimizer step is one minibatch update; one iteration samples `batch_size * grad_accum *
    num_minibatches` prompts per process and makes `ppo_epochs * num_minibatches` steps, so
    `max_steps` must be a multiple of that and checkpoints land on iteration boundaries."""

    type: str = "ppo"
    lr: float = 1e-4
    lr_schedule: str = "constant"
    temperature: float = 1.0  # rollout sampling temperature; PPO log-probs use the same logits / temperature
    top_p: float = 1.0  # rollout nucleus sampling
    ppo_epochs: int = 2  # passes over each rollout
    num_minibatches: int = 2  # optimizer steps per pass over a rollout
    clip_range: float = 0.2  # policy ratio clip
    clip_range_value: float | None = 0.2  # value clip around the rollout's values (None: off)
    vf_coef: float = 0.1  # weight of the value loss
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda
    kl_coef: float = 0.05  # initial coefficient of the per-token KL penalty
    adaptive_kl: bool = False  # steer kl_coef toward kl_target (Ziegler et al.)
    kl_target: float = 1.0  # nats per answer, with adaptive_kl
    kl_horizon: float = 10000.0  # samples over which adaptive_kl corrects fully
    whiten_advantages: bool = True  # normalise advantages over the rollout (all processes)
    missing_eos_penalty: float | None = None  # subtracted from the score of answers cut off before <|eot_id|>
    critic_init: str = "reward"  # reward | fresh: where the critic's adapter and head start
    separate_models: bool = False  # load reference, critic and reward on their own bases (more memory)
    reward_adapter: str | None = None  # reward model folder (default: the last reward stage's output)
    eval_kl_samples: int = 2  # sampled answers per held-out prompt for the evaluation's KL estimate
    disable_dropout: bool = True  # dropout (LoRA's too) off in every role, as TRL does: rollouts and updates see one policy
    lora: LoraConfig = field(default_factory=LoraConfig)  # adapters that start fresh (policy, critic)

    def __post_init__(self):
        super().__post_init__()
        where = f"stages.{self.name}"
        _positive(self, "temperature", "ppo_epochs", "num_minibatches", "clip_range", "clip_range_value",
                  "kl_target", "kl_horizon", "eval_kl_samples")
        _check(0 < self.top_p <= 1, f"{where}.top_p", "must be in (0, 1]")
        _check(self.vf_coef >= 0 and self.kl_coef >= 0, f"{where}.vf_coef/kl_coef", "must be >= 0")
        _check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, f"{where}.gamma/lam", "must be in [0, 1]")
        _check(self.critic_init in CRITIC_INITS, f"{where}.critic_init", f"must be one of {CRITIC_INITS}")
        per_iteration = self.steps_per_iteration
        _check(self.max_steps % per_iteration == 0, f"{where}.max_steps",
               f"must be a multiple of ppo_epochs x num_minibatches = {per_iteration} (one rollout's updates), "
               f"got {self.max_steps}")
        # Checkpoints only on iteration boundaries, where no rollout is half used.
        self.save_every = -(-self.save_every // per_iteration) * per_iteration

    @property
    def steps_per_iteration(self) -> int:
        return self.ppo_epochs * self.num_minibatches


STAGE_CONFIGS.update({"reward": RewardConfig, "ppo": PPOConfig})

GROUP_ADVANTAGES = ("grpo", "dr_grpo", "rloo")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
IMPORTANCE_SAMPLING = ("token", "sequence")


@dataclass
class RewardSpec:
    """One term of a GRPO stage's reward: a named function (alignment/rewards.py) and its weight."""

    name: str = "exact_match"  # exact_match | contains_answer | concise | format | reward_model | module:function
    weight: float = 1.0  # the answer's reward is the weighted sum of its terms


@dataclass
class GRPOConfig(StageConfig):
    """Critic-free online RL (GRPO family): G sampled answers per prompt, rewards from functions,
    advantages relative to the prompt's group, a clipped surrogate loss.

    `batch_size` counts prompts: a micro-batch holds `batch_size * num_generations` answers. One
    iteration samples `batch_size * grad_accum * num_minibatches` prompts per process and makes
    `num_iterations * num_minibatches` optimizer steps, so `max_steps` must be a multiple of that.
    GRPO: `advantage: grpo`, `loss_agg: seq_mean_token_mean`; Dr. GRPO: `dr_grpo` +
    `seq_mean_token_sum_norm`; RLOO: `rloo`; DAPO: `clip_high: 0.28`, `dynamic_sampling`,
    `token_mean`, `overlong_penalty`; GSPO: `importance_sampling: sequence`."""

    type: str = "grpo"
    lr: float = 1e-5
    lr_schedule: str = "constant"
    batch_size: int = 4  # prompts per micro-batch per process (each with num_generations answers)
    num_generations: int = 4  # G: answers sampled per prompt
    num_iterations: int = 1  # passes over each rollout (mu; >1 reuses samples with the clipped ratio)
    num_minibatches: int = 1  # optimizer steps per pass over a rollout
    temperature: float = 1.0  # sampling temperature; log-probs use the same logits / temperature
    top_p: float = 1.0  # nucleus sampling
    advantage: str = "grpo"  # grpo (group z-score) | dr_grpo (group mean removed) | rloo (leave-one-out)
    clip_low: float = 0.2  # ratio clip below: 1 - clip_low
    clip_high: float = 0.2  # ratio clip above: 1 + clip_high (DAPO's clip-higher: 0.28)
    importance_sampling: str = "token"  # token | sequence (GSPO: one ratio per answer)
    loss_agg: str = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum_norm
    kl_beta: float = 0.0  # weight of the k3 KL to the reference per token (0: no reference pass)
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal and sample more prompts (DAPO)
    max_sampling_rounds: int = 3  # with dynamic_sampling: sampling rounds per rollout before keeping equal groups
    overlong_penalty: float | None = None  # subtracted from the reward of answers cut off at max_new_tokens
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])  # weighted reward terms
    reward_adapter: str | None = None  # reward model folder for `reward_model` (default: the last reward stage's)
    eval_kl_samples: int = 2  # sampled answers per held-out prompt for the evaluation's KL estimate
    disable_dropout: bool = True  # dropout off: rollouts and updates see one policy (first ratio exactly 1)
    lora: LoraConfig = field(default_factory=LoraConfig)  # the `policy` adapter when none is inherited

    def __post_init__(self):
        super().__post_init__()
        where = f"stages.{self.name}"
        _positive(self, "num_generations", "num_iterations", "num_minibatches", "temperature",
                  "max_sampling_rounds", "eval_kl_samples")
        _check(0 < self.top_p <= 1, f"{where}.top_p", "must be in (0, 1]")
        _check(self.advantage in GROUP_ADVANTAGES, f"{where}.advantage", f"must be one of {GROUP_ADVANTAGES}")
        _check(self.advantage != "rloo" or self.num_generations > 1, f"{where}.num_generations",
               "rloo needs at least 2 answers per prompt")
        _check(self.loss_agg in LOSS_AGGREGATIONS, f"{where}.loss_agg", f"must be one of {LOSS_AGGREGATIONS}")
        _check(self.importance_sampling in IMPORTANCE_SAMPLING, f"{where}.importance_sampling",
               f"must be one of {IMPORTANCE_SAMPLING}")
        _check(0 <= self.clip_low < 1 and self.clip_high >= 0, f"{where}.clip_low/clip_high",
               "need 0 <= clip_low < 1 and clip_high >= 0")
        _check(self.kl_beta >= 0, f"{where}.kl_beta", "must be >= 0")
        _check(bool(self.rewards), f"{where}.rewards", "at least one reward is needed")
        from alignment.rewards import resolve

        for index, spec in enumerate(self.rewards):
            try:
                resolve(spec.name)
            except ValueError as error:
                raise ConfigError(f"{where}.rewards.{index}.name: {error}") from None
        per_iteration = self.steps_per_iteration
        _check(self.max_steps % per_iteration == 0, f"{where}.max_steps",
               f"must be a multiple of num_iterations x num_minibatches = {per_iteration} (one rollout's updates), "
               f"got {self.max_steps}")
        self.save_every = -(-self.save_every // per_iteration) * per_iteration

    @property
    def steps_per_iteration(self) -> int:
        return self.num_iterations * self.num_minibatches

    @property
    def uses_reward_model(self) -> bool:
        from alignment.rewards import REWARD_MODEL

        return any(spec.name == REWARD_MODEL for spec in self.rewards)


STAGE_CONFIGS["grpo"] = GRPOConfig


@dataclass
class RecipeConfig:
    """A whole run: model, data and the stages chained in order."""

    name: str = "recipe"  # shown in report.json and the model card
    output_dir: str = "outputs/run"  # where adapters, checkpoints, logs and report.json go
    seed: int = 0  # training seed (per-rank seeds derive from it)
    resume: bool = False  # continue from the newest complete checkpoint
    report_to: list[str] | str = field(default_factory=lambda: ["tensorboard"])  # tensorboard | wandb | trackio | none: one, or a list
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageConfig] = field(default_factory=list)

    def __post_init__(self):
        _check(len(self.stages) > 0, "stages", "a recipe needs at least one stage")
        names = [s.name for s in self.stages]
        _check(len(set(names)) == len(names), "stages", f"stage names must be unique, got {names}")
        if isinstance(self.report_to, str):  # `report_to: wandb` means [wandb]
            self.report_to = [self.report_to]
        _check(set(self.report_to) <= set(REPORT_TO), "report_to", f"values must be in {REPORT_TO}, got {self.report_to}")
        _check("none" not in self.report_to or len(self.report_to) == 1, "report_to", "none cannot be combined")
        for tracker in ("wandb", "trackio"):
            if tracker in self.report_to:
                import importlib.util

                _check(importlib.util.find_spec(tracker) is not None, "report_to",
                       f"{tracker} is not installed; pip install {tracker}, or use report_to: tensorboard")


def field_docs(cls) -> dict[str, str]:
    """Field name -> its doc line (the comment after it in the source)."""
    import inspect
    import re

    docs = {}
    for klass in reversed(cls.__mro__):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for match in re.finditer(r"^\s+(\w+): [^=\n]+=[^#\n]*#\s*(.+)$", source, re.M):
            docs[match.group(1)] = match.group(2).strip()
    return {f.name: docs.get(f.name, "") for f in fields(cls)}
