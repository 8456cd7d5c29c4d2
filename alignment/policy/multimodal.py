"""`MultimodalPolicy`: one base VLM (4-bit or not) with named adapters and scalar heads, the one object stages
hold. It is a composition of parts with one job each:

- loading and the model's facts (here): `from_pretrained`, quantisation, dtype, device, sizes;
- the adapter registry and roles (`roles.AdapterRoles`): add, switch, freeze, the reference;
- adapters on disk (`adapter_files.AdapterFiles`): save, load, copy;
- scoring (`scoring.Scoring`): image features, forwards, completion and pair log-probs, heads;
- generation (`alignment.generation`): an engine (`loop` by default) that `generate` hands the batch to.
"""

from __future__ import annotations

import torch
from torch import nn

from alignment.generation import (
    GenerationEngine,
    decode_answers,
    make_engine,
    stop_token_ids,
    unsampled_token_ids,
)
from alignment.models import family_of, load_model, load_processor
from alignment.models.features import ImageFeatures
from alignment.policy.adapter_files import AdapterFiles
from alignment.policy.roles import AdapterRoles
from alignment.policy.scoring import Scoring


class MultimodalPolicy(AdapterRoles, AdapterFiles, Scoring, nn.Module):
    """A VLM with named adapters and heads; see the module docstring."""

    synced_generation = False  # ZeRO-3 with several processes: the engine sets it (see `generation.all_finished`)

    def __init__(self, model: nn.Module, processor=None, engine: GenerationEngine | None = None):
        super().__init__()
        self.model = model
        self.processor = processor
        self.family = family_of(model)
        self.heads = nn.ModuleDict()
        self.trainable_adapters: set[str] = set()
        self.active_adapter: str | None = None
        self.own = nn.ModuleDict()  # method -> OwnAdapters (bitfit, prompt_tuning, bottleneck, base_weights)
        self.adapter_methods: dict[str, str] = {}  # adapter name -> menu method
        self.adapter_specs: dict = {}  # adapter name -> LoraSpec
        self.engine = engine or make_engine("loop")

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
        chat_template: str | None = None,
    ) -> MultimodalPolicy:
        """Load base model and processor (tiny name, local folder or hub id); base weights frozen. `chat_template`:
        a template file used in place of the checkpoint's (recipe key `model.chat_template`)."""
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
                                         max_pixels=max_pixels, chat_template=chat_template))

    # ------------------------------------------------------------------- facts
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

    def compute_dtype(self) -> torch.dtype:
        """The dtype activations are in: autocast's when it is on, else the embeddings'."""
        device = self.device.type
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return self.base_model.get_input_embeddings().weight.dtype

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
        """Sample completions for left-padded prompts through `self.engine`; images encoded once.

        With `num_samples` G > 1, each prompt is prefilled once and its KV cache (image
        cross-attention states included) serves G samples: rows p*G .. p*G + G-1 continue prompt p.
        Returns new tokens `[B*G, L]` (L <= max_new_tokens); after a row's <|eot_id|> (or other stop
        token) it holds the pad id. temperature 0 is greedy. `generator`: one for the whole batch, or a
        list of B*G, one per answer row (each row's sample then depends only on its own generator and
        logits, not on which other rows share the batch).
        """
        return self.engine.generate(self, batch, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p, image_features=image_features, generator=generator,
                                    num_samples=num_samples)

    def stop_token_ids(self) -> set[int]:
        """Token ids that end an answer (`alignment.generation.stop_token_ids`)."""
        return stop_token_ids(self.processor, self.base_model)

    def unsampled_token_ids(self, vocab_size: int) -> list[int]:
        """Ids generation must never emit: the family's image placeholders within the vocabulary."""
        return unsampled_token_ids(self.family, self.config, vocab_size)

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """New tokens [B, L] -> answer strings, cut at the first stop token."""
        return decode_answers(self.processor.tokenizer, tokens, self.stop_token_ids())
