"""`MultimodalPolicy`: one base VLM (4-bit or not) with named adapters and scalar heads.

Adapters are LoRA by default; `LoraSpec.method` picks another from the PEFT menu
(`alignment.adapters.menu`: dora, ia3, loha, lora_fa, qlora through PEFT; bitfit, prompt tuning and
seed 003's Bottleneck Adapter kept beside the base). Several named adapters coexist when they are
of one kind (all PEFT of one type, or all of one own method); base weights trained in full (the
`projector` stage's) sit under any of them and travel with every adapter saved afterwards.

One base serves every role of post-training:
- the actor / policy: a trainable adapter (`policy`);
- the reference model: the same base with every adapter off (`reference()`);
- the critic and the reward model: their own adapters (`critic`, `reward`) plus a scalar head each.

Images are encoded once (`encode_images`) and the features are reused by every sequence that
shows the same image (chosen and rejected, policy and reference), through `image_index`.

Batch keys (from `alignment.data` collators): `input_ids [B,T]`, `attention_mask [B,T]`,
`labels [B,T]` (-100 off the completion), `image_index [B]` (row -> image), the family's pixel
inputs for N images, and for Mllama `cross_attention_mask [B,T,1,tiles]`.
"""

from __future__ import annotations

import itertools
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from alignment.losses import logprobs_at, sequence_logprobs
from alignment.models import family_of, load_model, load_processor
from alignment.models.features import ImageFeatures, repeat_state
from alignment.models.shared_prefix import ATTENTION_KINDS, attention_mask_for, is_right_padded
from alignment.models.shared_prefix import share_prefix as pack_pairs

PRESETS = ("language", "cross_attention", "vision", "multimodal", "all")
ADAPTER_FILE = "adapter_model.safetensors"
REFERENCE = "reference"
TUNER_KEY = re.compile(r"lora_|ia3_|hada_")
HEAD_FILE = "head.safetensors"
METHOD_FILE = "adapter_method.json"  # the menu method of a PEFT adapter that is not plain lora
BASE_WEIGHTS_FILE = "base_weights.safetensors"  # base weights trained in full (projector stage), carried along
BASE_WEIGHTS_CONFIG = "base_weights.json"
PEFT_TYPES = {"ia3": "IA3", "loha": "LOHA"}  # menu method -> PEFT's peft_type where it is not LORA


@dataclass
class LoraSpec:
    """Settings of one adapter: LoRA's, or another method's of the PEFT menu."""

    method: str = "lora"  # lora | qlora | dora | ia3 | loha | lora_fa | bitfit | prompt_tuning | bottleneck | prefix_tuning | tinytl | bitdelta | full
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    preset: str = "language"  # language | cross_attention | vision | multimodal | all
    target_modules: list[str] | None = None  # exact module names; overrides the preset
    lm_head: bool = False  # LoRA methods: also adapt the output head (the vocabulary projection)
    extra_trainable: list[str] = field(default_factory=list)  # regexes of base params trained in full
    dim: int = 16  # bottleneck: adapter dimension d
    groups: int = 2  # bottleneck: groups k of the up-projection
    scale: float = 1.0  # bottleneck: fixed scale s of the adapter's output
    visual_dim: int | None = None  # bottleneck: SwiGLU visual adapter width d_v (None: keep the projector)
    num_virtual_tokens: int = 8  # prompt_tuning, prefix_tuning: prompt / prefix length n
    prefix_projection: bool = False  # prefix_tuning: through PEFT's reparameterisation MLP (width dim)

    def __post_init__(self):
        from alignment.adapters.menu import METHODS

        if self.method not in METHODS + ("base_weights",):
            raise ValueError(f"adapter method must be one of {METHODS}, got {self.method!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"lora preset must be one of {PRESETS}, got {self.preset!r}")
        if self.r <= 0:
            raise ValueError(f"lora r must be positive, got {self.r}")


def resolve_preset(model: nn.Module, preset: str) -> list[str]:
    """The exact, sorted names of the linear modules a LoRA preset targets in `model`."""
    if preset not in PRESETS:
        raise ValueError(f"lora preset must be one of {PRESETS}, got {preset!r}")
    pattern = re.compile(family_of(model).PRESET_PATTERNS[preset])
    # A module LoRA already wraps keeps its name (its linear moves to `.base_layer`).
    names = [
        n for n, m in model.named_modules()
        if (isinstance(m, nn.Linear) or hasattr(m, "base_layer")) and "lora_" not in n
        and not n.endswith(".base_layer") and pattern.fullmatch(n)
    ]
    if not names:
        raise ValueError(f"lora preset {preset!r} matches no linear module of {type(model).__name__}")
    return sorted(names)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class MultimodalPolicy(nn.Module):
    """A VLM with named adapters and heads; see the module docstring."""

    def __init__(self, model: nn.Module, processor=None):
        super().__init__()
        self.model = model
        self.processor = processor
        self.family = family_of(model)
        self.heads = nn.ModuleDict()
        self.trainable_adapters: set[str] = set()
        self.active_adapter: str | None = None
        self.own = nn.ModuleDict()  # method -> OwnAdapters (bitfit, prompt_tuning, bottleneck, base_weights)
        self.adapter_methods: dict[str, str] = {}  # adapter name -> menu method
        self.adapter_specs: dict[str, LoraSpec] = {}

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        quantization: str = "none",
        dtype: torch.dtype = torch.float32,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> MultimodalPolicy:
        """Load base model and processor (tiny name, local folder or hub id); base weights frozen."""
        model = load_model(name_or_path, quantization=quantization, dtype=dtype, trust_remote_code=trust_remote_code)
        model.requires_grad_(False)
        # Frozen weights keep the checkpoint's dtype. PEFT's prepare_model_for_kbit_training would upcast
        # every unquantised weight (vision tower, embeddings, lm_head: 1.95B of the 11B's 10.7B) to fp32,
        # +3.9 GB on the GPU for weights nothing trains: autocast computes in bf16 anyway and the adapters PEFT adds are fp32.
        # Non-reentrant checkpointing: the reentrant kind cannot backward through image features computed
        # outside the checkpointed layers ("backward through the graph a second time").
        if gradient_checkpointing:
            family_of(model).enable_gradient_checkpointing(model)
        model.config.use_cache = False
        return cls(model, load_processor(name_or_path, trust_remote_code=trust_remote_code, min_pixels=min_pixels,
                                         max_pixels=max_pixels))

    @property
    def base_model(self) -> nn.Module:
        """The transformers model (under PEFT's wrappers, LoRA layers included)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def config(self):
        return self.base_model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return self.config.get_text_config().hidden_size

    @property
    def quantization(self) -> str:
        """none | 4bit | 8bit, read from the base's layers."""
        kinds = {type(m).__name__ for m in self.base_model.modules()}
        return "4bit" if "Linear4bit" in kinds else "8bit" if "Linear8bitLt" in kinds else "none"

    # ---------------------------------------------------------------- adapters
    def _output_head_name(self) -> str:
        """The module name of the vocabulary projection (lm_head)."""
        head = self.base_model.get_output_embeddings()
        names = [n for n, m in self.base_model.named_modules() if m is head or getattr(m, "base_layer", None) is head]
        if not names:
            raise ValueError(f"{type(self.base_model).__name__} has no output head to adapt (lora.lm_head)")
        return names[0]

    def add_adapter(self, name: str, spec: LoraSpec, trainable: bool = True, head: bool = False) -> list[str]:
        """Add an adapter of `spec.method` (and optionally a scalar head); returns the targeted module
        names. Refuses (ValueError) a method the base cannot run, and mixing kinds of adapters."""
        from alignment.adapters.menu import PEFT_METHODS, check_method, own_adapters_class, peft_config

        if name in self.adapter_methods:
            raise ValueError(f"adapter {name!r} exists already")
        method = spec.method
        if method != "base_weights":
            check_method(method, self.quantization)
            kinds = {self._kind(m) for n, m in self.adapter_methods.items() if m != "base_weights"}
            if kinds - {self._kind(method)}:
                raise ValueError(f"adapter {name!r} ({method}) cannot join adapters {self.adapters} of another "
                                 f"kind ({sorted(kinds)}): one model holds adapters of one PEFT type or one own method")
        if method in PEFT_METHODS:
            targets = spec.target_modules or resolve_preset(self.base_model, spec.preset)
            if spec.lm_head:
                targets = sorted({*targets, self._output_head_name()})
            self._add_peft(name, peft_config(spec, targets))
        else:
            if method not in self.own:
                self.own[method] = own_adapters_class(method)(self.base_model)
            targets = self.own[method].add(name, spec)
        self.adapter_methods[name] = method
        self.adapter_specs[name] = spec
        if trainable:
            self.trainable_adapters.add(name)
        if head:
            self.heads[name] = nn.Linear(self.hidden_size, 1, dtype=torch.float32, device=self.device)
            nn.init.normal_(self.heads[name].weight, std=1.0 / (self.hidden_size + 1) ** 0.5)
            nn.init.zeros_(self.heads[name].bias)
        self.set_adapter(name)
        return targets

    def _add_peft(self, name: str, config) -> None:
        from peft import get_peft_model

        if hasattr(self.model, "peft_config"):
            self.model.add_adapter(name, config)
        else:
            self.model = get_peft_model(self.model, config, adapter_name=name)

    @staticmethod
    def _kind(method: str) -> str:
        from alignment.adapters.menu import PEFT_METHODS

        return f"peft:{PEFT_TYPES.get(method, 'LORA')}" if method in PEFT_METHODS else method

    def _own_of(self, name: str):
        method = self.adapter_methods.get(name)
        return self.own[method] if method in self.own else None

    @property
    def adapters(self) -> list[str]:
        return list(getattr(self.model, "peft_config", {})) + [n for own in self.own.values() for n in own.names]

    def set_adapter(self, name: str) -> None:
        """Make `name` the adapter that forwards use; trainability of every adapter is kept
        (lora_fa's A stays frozen; base weights are always on)."""
        from alignment.adapters.menu import TUNER_PARAM

        method = self.adapter_methods.get(name, "lora")
        if method != "base_weights":
            if name in getattr(self.model, "peft_config", {}):
                self.model.set_adapter(name)
            for own in self.own.values():
                own.set_active(name if name in own.names else None)
        self.active_adapter = name
        for param_name, param in self.model.named_parameters():
            match = TUNER_PARAM.search(param_name)
            if match:
                adapter = match.group(2)
                frozen_a = self.adapter_methods.get(adapter) == "lora_fa" and match.group(1) == "lora_A"
                param.requires_grad_(adapter in self.trainable_adapters and not frozen_a)
        for own in self.own.values():
            for adapter in own.names:
                for param in own.parameters_of(adapter):
                    param.requires_grad_(adapter in self.trainable_adapters)

    def freeze_adapter(self, name: str) -> None:
        """Stop training adapter `name` (its weights stay in use)."""
        self.trainable_adapters.discard(name)
        if self.active_adapter is not None:
            self.set_adapter(self.active_adapter)

    @contextmanager
    def use_adapter(self, name: str):
        previous = self.active_adapter
        self.set_adapter(name)
        try:
            yield self
        finally:
            if previous is not None:
                self.set_adapter(previous)

    @contextmanager
    def reference(self):
        """The reference model: the frozen `reference` adapter when one exists (a copy of the
        adapter a stage started from, e.g. SFT's for DPO), else every adapter off (the base)."""
        from contextlib import ExitStack

        if REFERENCE in self.adapters:
            with self.use_adapter(REFERENCE):
                yield self
            return
        with ExitStack() as stack:
            if hasattr(self.model, "disable_adapter"):
                stack.enter_context(self.model.disable_adapter())
            for own in self.own.values():
                stack.enter_context(own.disabled())
            yield self

    def freeze_reference(self, source: str) -> None:
        """Make a frozen `reference` adapter holding a copy of adapter `source`."""
        if REFERENCE not in self.adapters:
            if source in getattr(self.model, "peft_config", {}):
                self.model.add_adapter(REFERENCE, self.model.peft_config[source])
                self.adapter_methods[REFERENCE] = self.adapter_methods.get(source, "lora")
            else:
                self.add_adapter(REFERENCE, self.adapter_specs[source], trainable=False)
            self.set_adapter(source)
        self.copy_adapter(source, REFERENCE)

    @property
    def vision_is_adapted(self) -> bool:
        """True when any adapter touches the vision tower or projector (features then differ per adapter)."""
        return any(self.vision_adapted_by(name) for name in self.adapters)

    def vision_adapted_by(self, name: str | None) -> bool:
        """True when adapter `name` touches the vision tower or projector, so that image features under
        it differ from the bare base's (None: no adapter, the base). Base weights trained in full (the
        projector stage's) sit under every adapter and do not make one adapter's features differ."""
        from alignment.adapters.menu import TUNER_PARAM

        if name is None:
            return False
        vision = self.family.VISION_PATTERN
        for param_name, _ in self.model.named_parameters():
            match = TUNER_PARAM.search(param_name)
            if match and match.group(2) == name and re.search(vision, param_name):
                return True
        own = self._own_of(name)
        return own is not None and self.adapter_methods.get(name) != "base_weights" and own.touches_vision(name)

    def reference_adapter(self) -> str | None:
        """The adapter `reference()` runs under: the frozen `reference` copy, else None (the bare base)."""
        return REFERENCE if REFERENCE in self.adapters else None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Every adapter's and head's parameters, trained or frozen (not the base's)."""
        segments = tuple(f".{name}." for name in self.adapters)
        return [p for n, p in self.named_parameters()
                if n.startswith("heads.") or p.requires_grad or any(s in f".{n}." for s in segments)]

    def _peft_state(self, name: str) -> dict[str, torch.Tensor]:
        """PEFT adapter `name`'s own weights. save_embedding_layers=False: with `lm_head: true` PEFT
        would also return the frozen base head (the whole vocabulary projection)."""
        from peft import get_peft_model_state_dict

        # PEFT filters a state dict; ours skips the 4-bit base weights, whose serialisation bitsandbytes
        # runs per weight (on CPU it unpacks each one, and fails when they are stored as floats for ZeRO-3).
        tensors = itertools.chain(self.model.named_parameters(), self.model.named_buffers())
        state = {key: t for key, t in tensors if t.__class__.__name__ != "Params4bit"}
        return get_peft_model_state_dict(self.model, state_dict=state, adapter_name=name, save_embedding_layers=False)

    def save_adapter(self, name: str, folder: str | Path) -> Path:
        """Write adapter `name` in PEFT's format (adapter_config.json + safetensors), and its head."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        own = self._own_of(name)
        if own is not None:
            own.save(name, folder)
        else:
            self.model.peft_config[name].save_pretrained(str(folder))
            state = self._peft_state(name)
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / ADAPTER_FILE))
            method = self.adapter_methods.get(name, "lora")
            if method != "lora":
                (folder / METHOD_FILE).write_text(json.dumps({"method": method}))
        base = self.own["base_weights"] if "base_weights" in self.own else None
        if base is not None and own is not base:
            (base_name,) = base.names
            save_file({k: v.detach().cpu().contiguous() for k, v in base.state_of(base_name).items()},
                      str(folder / BASE_WEIGHTS_FILE))
            (folder / BASE_WEIGHTS_CONFIG).write_text(json.dumps({"name": base_name, **base.configs[base_name]}))
        if name in self.heads:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.heads[name].state_dict().items()},
                      str(folder / HEAD_FILE))
        return folder

    def load_adapter(self, name: str, folder: str | Path, trainable: bool = True) -> None:
        """Load (or overwrite) adapter `name` from a folder written by `save_adapter` or PEFT."""
        from peft import PeftConfig, set_peft_model_state_dict
        from safetensors.torch import load_file

        from alignment.adapters.base import read_config
        from alignment.adapters.menu import method_of_peft_type

        folder = Path(folder)
        if not (folder / ADAPTER_FILE).exists():
            raise FileNotFoundError(f"no {ADAPTER_FILE} in {folder}")
        if (folder / BASE_WEIGHTS_FILE).exists():  # base weights trained in an earlier stage come first
            self._load_base_weights(json.loads((folder / BASE_WEIGHTS_CONFIG).read_text()),
                                    load_file(str(folder / BASE_WEIGHTS_FILE), device=str(self.device)), folder)
        saved = read_config(folder)
        own_method = method_of_peft_type(saved.get("peft_type", ""))
        state = load_file(str(folder / ADAPTER_FILE), device=str(self.device))
        if own_method == "base_weights":
            self._load_base_weights({"name": name, **saved}, state, folder, trainable)
        elif own_method is not None:
            if name not in self.adapters:
                fields = {k: saved[k] for k in ("dim", "groups", "scale", "dropout", "preset", "visual_dim",
                                                "num_virtual_tokens", "prefix_projection", "target_modules")
                          if k in saved}
                self.add_adapter(name, LoraSpec(method=own_method, **fields), trainable=trainable)
            self._own_of(name).load_state_of(name, state, str(folder))
        else:
            if name not in self.adapters:
                config = PeftConfig.from_pretrained(str(folder))
                self._add_peft(name, config)
                self.adapter_methods[name] = _saved_peft_method(folder, config)
                if trainable:
                    self.trainable_adapters.add(name)
            result = set_peft_model_state_dict(self.model, state, adapter_name=name)
            unexpected = [k for k in getattr(result, "unexpected_keys", []) if TUNER_KEY.search(k)]
            if unexpected:
                raise ValueError(f"adapter in {folder} does not fit this model: unexpected keys {unexpected[:3]}")
        if (folder / HEAD_FILE).exists():
            head_state = load_file(str(folder / HEAD_FILE), device=str(self.device))
            if name not in self.heads:
                self.heads[name] = nn.Linear(self.hidden_size, 1, device=self.device)
            self.heads[name].load_state_dict(head_state)
        if trainable:
            self.trainable_adapters.add(name)
        self.set_adapter(name)

    def _load_base_weights(self, config: dict, state: dict, folder: Path, trainable: bool = False) -> None:
        """Base weights (the projector stage's) into the base, creating their named set if needed."""
        name = config["name"]
        if "base_weights" not in self.own or name not in self.own["base_weights"].names:
            self.add_adapter(name, LoraSpec(method="base_weights", target_modules=config["target_modules"]),
                             trainable=trainable)
        self.own["base_weights"].load_state_of(name, state, str(folder))

    def copy_adapter(self, source: str, target: str) -> None:
        """Copy the adapter weights (and head) of `source` into the existing adapter `target`."""
        from peft import set_peft_model_state_dict

        own = self._own_of(source)
        if own is not None:
            own.copy(source, target)
        else:
            set_peft_model_state_dict(self.model, self._peft_state(source), adapter_name=target)
        if source in self.heads and target in self.heads:
            self.heads[target].load_state_dict(self.heads[source].state_dict())

    # ------------------------------------------------------------------ images
    def pixel_inputs(self, batch: dict) -> dict:
        """The batch's pixel tensors for its N images (the family's `PIXEL_KEYS`)."""
        return {k: batch[k] for k in self.family.PIXEL_KEYS if k in batch}

    def _token_inputs(self, batch: dict) -> dict:
        """The batch's token-aligned tensors the family's forward reads (its `TOKEN_KEYS`: Mllama's
        cross-attention mask)."""
        return {k: batch[k] for k in self.family.TOKEN_KEYS if k in batch}

    def encode_images(self, batch: dict) -> ImageFeatures:
        """The batch's N images encoded once, in one vision call (`ImageFeatures`: Mllama
        `[N, tiles*patches, hidden]` cross-attention states, LLaVA `[N, patches, hidden]`, Qwen merged
        patches of a different length per image)."""
        return self.family.encode_images(self.model, **self.pixel_inputs(batch))

    def _features(self, batch: dict, image_features: ImageFeatures | None) -> ImageFeatures | None:
        """`image_features`, else the batch's images encoded now (None for a batch without images)."""
        if image_features is not None:
            return image_features
        return self.encode_images(batch) if "pixel_values" in batch else None

    def _image_index(self, batch: dict) -> torch.Tensor:
        """`[B]` or `[B, K]` (-1: empty slot): which images each row shows; row i -> image i by default."""
        index = batch.get("image_index")
        if index is None:
            index = torch.arange(batch["input_ids"].shape[0])
        return index.to(batch["input_ids"].device)

    # ---------------------------------------------------------------- forwards
    def forward(self, batch: dict, image_features: ImageFeatures | None = None, hidden: bool = False,
                logits_at: torch.Tensor | int | None = None):
        """Causal-LM output for the batch's rows; `image_features` from `encode_images` skips the
        vision tower. With `hidden=True` the output carries `hidden_states` (last one used by heads).
        `logits_at`: positions `[W]` (or the last n) whose logits are computed; None: every position."""
        kwargs = self._token_inputs(batch)
        if logits_at is not None:
            kwargs["logits_to_keep"] = logits_at
        return self.family.forward_with_features(
            self.model,
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            features=self._features(batch, image_features),
            image_index=self._image_index(batch),
            output_hidden_states=hidden,
            use_cache=False,
            **kwargs,
        )

    def windowed_logits(self, batch: dict, image_features: ImageFeatures | None = None):
        """Logits only where labels count: `(logits [B, W, V] in the model's dtype, labels [B, W], start)`.

        The window is positions `start .. start+W-1` of the rows, the span from the first position whose
        logits predict a labelled token (`labels[:, t+1] != -100` in some row) to one past the last, so a
        shifted loss on `(logits, labels)` (`logits[:, :-1]` against `labels[:, 1:]`) counts exactly what
        it counts on the whole rows. The LM head and its `[B, T, V]` output never run over the prompt
        (LLaVA's 576 image tokens, Qwen's hundreds)."""
        labels = batch["labels"]
        counted = (labels[:, 1:] != -100).any(dim=0).nonzero().flatten()
        start, end = (int(counted[0]), int(counted[-1]) + 2) if counted.numel() else (0, min(2, labels.shape[1]))
        positions = torch.arange(start, end, device=labels.device)
        return self.forward(batch, image_features, logits_at=positions).logits, labels[:, start:end], start

    def completion_logprobs(self, batch: dict, image_features: ImageFeatures | None = None):
        """Log-probs of the labelled (completion) tokens under the active adapter.

        Returns `(token_logprobs [B, T-1], seq_logprobs [B], mask [B, T-1])`; position t scores
        token t+1 given tokens <= t; mask is 1.0 on completion tokens. Logits are computed over the
        labelled window only (`windowed_logits`) and upcast one row at a time (`gather_logprobs`).
        """
        logits, labels, start = self.windowed_logits(batch, image_features)
        return _window_logprobs(batch, logits, labels, start)

    # ------------------------------------------------- preference pairs, shared prefix
    def shares_prefix(self) -> bool:
        """Whether a preference pair can run as one row (`alignment.models.shared_prefix`): the family carries
        positions over, and the attention implementation takes a custom mask (SDPA, eager)."""
        kind = getattr(self.config.get_text_config(), "_attn_implementation", None)
        # prompt tuning prepends its virtual tokens to 2-D masks only
        return bool(getattr(self.family, "SHARES_PREFIX", False)) and kind in ATTENTION_KINDS and "prompt_tuning" not in self.own

    def _pairs_packed(self, batch: dict, share: bool):
        """The batch's pairs as one row each, or None where they run as two rows (not asked, not supported)."""
        if not (share and "num_pairs" in batch and self.shares_prefix() and is_right_padded(batch["attention_mask"])):
            return None
        return pack_pairs(batch["input_ids"], batch["attention_mask"], batch["num_pairs"])

    def _packed_forward(self, batch: dict, packed, image_features, hidden: bool = False, logits_at=None):
        """The causal-LM output over the packed rows `[P, S]`: each token at its own row's position (2-D or
        M-RoPE, from the family), the block mask of `packed.allowed`, token-aligned inputs carried over."""
        features = self._features(batch, image_features)
        index = self._image_index(batch)
        positions = self.family.position_ids(self.model, batch["input_ids"], batch["attention_mask"], features, index)
        kwargs = {key: packed.gather(value) for key, value in self._token_inputs(batch).items()}
        if logits_at is not None:
            kwargs["logits_to_keep"] = logits_at
        kind = self.config.get_text_config()._attn_implementation
        return self.family.forward_with_features(
            self.model,
            input_ids=packed.input_ids,
            attention_mask=attention_mask_for(packed.allowed, kind, self._compute_dtype()),
            features=features,
            image_index=index[: packed.num_pairs],  # a pair's rows show the same images
            position_ids=packed.gather(positions, row_dim=positions.dim() - 2),
            output_hidden_states=hidden,
            use_cache=False,
            **kwargs,
        )

    def _compute_dtype(self) -> torch.dtype:
        """The dtype activations are in: autocast's when it is on, else the embeddings'."""
        device = self.device.type
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return self.base_model.get_input_embeddings().weight.dtype

    def pair_logprobs(self, batch: dict, image_features: ImageFeatures | None = None, share_prefix: bool = True):
        """`completion_logprobs` of a preference batch (rows 0..P-1 chosen, P..2P-1 rejected), each pair's
        image + prompt prefix through the language model once (one packed row per pair) where the family and
        attention allow it; the same values and gradients as two rows, up to float rounding."""
        packed = self._pairs_packed(batch, share_prefix)
        labels = batch["labels"]
        counted = labels[:, 1:] != -100  # [2P, T-1]: position t predicts a counted token t+1
        if packed is None or not bool(counted.any()):
            return self.completion_logprobs(batch, image_features)
        rows, steps = counted.nonzero(as_tuple=True)  # original row, and the position predicting its token
        where = packed.packed_pos[rows, steps]  # that position in the pair's packed row
        low, high = int(where.min()), int(where.max()) + 1
        out = self._packed_forward(batch, packed, image_features,
                                   logits_at=torch.arange(low, high, device=labels.device))
        picked = logprobs_at(out.logits, packed.pair_of_row()[rows], where - low, labels[rows, steps + 1])
        mask = counted.float()
        token_logprobs = mask.new_zeros(mask.shape).index_put((rows, steps), picked)
        return token_logprobs, token_logprobs.sum(dim=-1), mask

    def pair_sequence_scores(self, batch: dict, head: str, image_features: ImageFeatures | None = None,
                             share_prefix: bool = True) -> torch.Tensor:
        """`sequence_scores` of a preference batch's 2P rows, each pair's prefix run once (see `pair_logprobs`)."""
        packed = self._pairs_packed(batch, share_prefix)
        if packed is None:
            return self.sequence_scores(batch, head, image_features)
        out = self._packed_forward(batch, packed, image_features, hidden=True, logits_at=1)
        last = batch["attention_mask"].long().cumsum(-1).argmax(-1)  # [2P]
        where = packed.packed_pos.gather(1, last[:, None]).squeeze(1)
        hidden = out.hidden_states[-1][packed.pair_of_row(), where]  # [2P, H]
        return self.heads[head](hidden.float()).squeeze(-1)


    def head_values(self, batch: dict, head: str, image_features: ImageFeatures | None = None) -> torch.Tensor:
        """Scalar head `head` on every position's last hidden state: values [B, T] (float32).

        Call under `use_adapter(head)` (or another adapter) to choose the LoRA weights under it."""
        out = self.forward(batch, image_features, hidden=True, logits_at=1)  # the LM head: last position only
        return self.heads[head](out.hidden_states[-1].float()).squeeze(-1)

    def sequence_scores(self, batch: dict, head: str, image_features: ImageFeatures | None = None) -> torch.Tensor:
        """The head's value at each row's last non-padding token: scores [B] (the reward model's output)."""
        values = self.head_values(batch, head, image_features)
        last = batch["attention_mask"].long().cumsum(-1).argmax(-1)
        return values.gather(1, last[:, None]).squeeze(1)

    # -------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        batch: dict,
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        image_features: ImageFeatures | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_samples: int = 1,
    ) -> torch.Tensor:
        """Sample completions for left-padded prompts with a KV cache; images encoded once.

        With `num_samples` G > 1, each prompt is prefilled once and its KV cache (image
        cross-attention states included) serves G samples: rows p*G .. p*G + G-1 continue prompt p.
        Returns new tokens `[B*G, L]` (L <= max_new_tokens); after a row's <|eot_id|> (or other stop
        token) it holds the pad id. temperature 0 is greedy. `generator`: one for the whole batch, or a
        list of B*G, one per answer row (each row's sample then depends only on its own generator and
        logits, not on which other rows share the batch).
        """
        tokenizer = self.processor.tokenizer
        stop_ids = torch.tensor(sorted(self._stop_token_ids()), device=self.device)
        pad_id = tokenizer.pad_token_id
        attention_mask = batch["attention_mask"]
        logits, state = self.family.prefill(
            self.model, batch["input_ids"], attention_mask, self._features(batch, image_features),
            self._image_index(batch), **self._token_inputs(batch))
        if num_samples > 1:  # one prefill per prompt, then G rows each
            state = repeat_state(state, num_samples)
            logits, attention_mask = (x.repeat_interleave(num_samples, dim=0) for x in (logits, attention_mask))
        finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=self.device)
        if isinstance(generator, (list, tuple)) and len(generator) != logits.shape[0]:
            raise ValueError(f"generate: {len(generator)} row generators for {logits.shape[0]} answer rows")
        new_tokens = []
        never = self._unsampled_token_ids(logits.shape[-1])
        for _ in range(max_new_tokens):
            logits = logits.float()
            logits[:, never] = float("-inf")  # an answer never holds an image placeholder
            token = _sample(logits, temperature, top_p, generator)
            token = torch.where(finished, torch.full_like(token, pad_id), token)
            new_tokens.append(token)
            finished |= torch.isin(token, stop_ids)
            if _all_finished(finished, self.synced_generation):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
            logits = self.family.decode(self.model, state, token, attention_mask)
        return torch.stack(new_tokens, dim=1)

    def _unsampled_token_ids(self, vocab_size: int) -> list[int]:
        """Ids generation must never emit (the family's: image placeholders where the output head has a
        row for them). A sampled placeholder would make the next forward look for image features that
        are not there."""
        return [i for i in self.family.unsampled_token_ids(self.config) if 0 <= i < vocab_size]

    synced_generation = False  # ZeRO-3 with several processes: the engine sets it (see `_all_finished`)

    def _stop_token_ids(self) -> set[int]:
        """Token ids that end an answer: the generation config's and text config's EOS ids (Llama 3.2
        Vision: 128001, 128008, 128009), the tokenizer's EOS, and the chat template's end of turn."""
        from alignment.data.prompts import prompt_format

        tokenizer = self.processor.tokenizer
        ids = {tokenizer.eos_token_id}
        end_of_turn = prompt_format(self.processor).end_of_turn
        end_id = tokenizer.convert_tokens_to_ids(end_of_turn) if end_of_turn else None
        if isinstance(end_id, int) and end_id != tokenizer.unk_token_id:
            ids.add(end_id)
        generation = getattr(self.base_model, "generation_config", None)
        for eos in (self.config.get_text_config().eos_token_id, getattr(generation, "eos_token_id", None)):
            ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return {i for i in ids if i is not None and i >= 0}

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """New tokens [B, L] -> answer strings, cut at the first stop token."""
        stops = self._stop_token_ids()
        texts = []
        for row in tokens.tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            texts.append(self.processor.tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        return texts


def _window_logprobs(batch: dict, logits: torch.Tensor, labels: torch.Tensor, start: int):
    """`completion_logprobs`' triple from logits `[B, W, V]` over positions `start .. start+W-1` and their
    labels `[B, W]`: token log-probs padded back to `[B, T-1]`, their sum per row, the completion mask."""
    window_logprobs, seq_logprobs = sequence_logprobs(logits, labels.clamp(min=0), (labels != -100).float())
    columns = batch["labels"].shape[1] - 1
    token_logprobs = nn.functional.pad(window_logprobs, (start, columns - start - window_logprobs.shape[1]))
    return token_logprobs, seq_logprobs, (batch["labels"][:, 1:] != -100).float()


def _all_finished(finished: torch.Tensor, synced: bool) -> bool:
    """Whether generation stops: every row here has stopped, and with `synced` every row of every
    process. Under ZeRO-3 each forward gathers parameters with all processes, so a process whose rows
    stopped keeps stepping (emitting pad) until all have (transformers' `synced_gpus`)."""
    done = bool(finished.all())
    if not synced:
        return done
    import torch.distributed as dist

    flag = torch.tensor([0.0 if done else 1.0], device=finished.device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)  # processes not yet done
    return flag.item() == 0


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: greedy at temperature 0, else nucleus sampling. `generator`: one
    torch.Generator (or None) for the batch, or a list of B, one per row (inverse-CDF sampling with one
    uniform draw per row from the row's own generator)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    if not isinstance(generator, (list, tuple)):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    uniforms = torch.stack([torch.rand((), generator=g, device=g.device, dtype=torch.float64) for g in generator])
    cdf = probs.double().cumsum(-1)
    targets = (uniforms.to(cdf.device) * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, targets, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def _saved_peft_method(folder: Path, config) -> str:
    """The menu method of a PEFT adapter folder: its METHOD_FILE, else read off the PEFT config."""
    if (folder / METHOD_FILE).exists():
        return json.loads((folder / METHOD_FILE).read_text())["method"]
    if getattr(config, "use_dora", False):
        return "dora"
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    return {v: k for k, v in PEFT_TYPES.items()}.get(peft_type, "lora")
