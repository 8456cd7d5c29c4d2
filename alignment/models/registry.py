"""Resolve a model name to a folder, and load model and processor from it."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch

from alignment.models import generic, llava, mllama, qwen_vl
from alignment.quiet import without_library_progress_bars

_FAMILY_MODULES = (mllama, llava, qwen_vl, generic)
FAMILIES: dict[str, ModuleType] = {t: module for module in _FAMILY_MODULES for t in module.MODEL_TYPES}
TINY_MODELS: dict[str, str] = {name: t for module in _FAMILY_MODULES for name, t in module.TINY_MODELS.items()}
TINY_FAMILIES: dict[str, ModuleType] = {name: module for module in _FAMILY_MODULES for name in module.TINY_MODELS}
_NOTED: set[str] = set()  # model types the generic family's note was printed for (once per process)
QUANTIZATIONS = ("none", "4bit", "8bit")
_SHIPPED = Path(__file__).parent / "assets"
_COMPLETE = "COMPLETE"


def cache_root() -> Path:
    """`$VLM_ALIGN_CACHE`, else `~/.cache/vlm-align`."""
    return Path(os.environ.get("VLM_ALIGN_CACHE", Path.home() / ".cache" / "vlm-align"))


class UnsupportedModelError(ValueError):
    """A model that is not an image-text-to-text model this library can train; one line for the user."""


def family_of(model_or_config) -> ModuleType:
    """The family module (`alignment.models.mllama`, `llava`, `qwen_vl`, `generic`) of a model, PEFT model or config:
    `generic` for any other image-text-to-text model type (a note on stderr, once per process and type)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise UnsupportedModelError(
            f"model type {model_type!r} ({type(config).__name__}) is not a vision-language model vlm-align supports; "
            f"supported model types: {', '.join(sorted(FAMILIES))}, and any other image-text-to-text model type")
    if model_type not in _NOTED:
        _NOTED.add(model_type)
        print(f"note: model type {model_type!r} has no family file: every stage runs the plain forward with each "
              "row's pixels (images are not shared between rows, roles or samples)", file=sys.stderr)
    return generic


def _build_atomically(name: str, folder: Path, write) -> None:
    """`write(staging)` into a fresh staging folder beside `folder`, then swap it in: a reader never sees
    half a model folder (COMPLETE is written last)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        write(staging)
        (staging / _COMPLETE).write_text(name)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _build_tiny(name: str, folder: Path) -> None:
    """Write tokenizer, processor, config and weights of a tiny model into `folder`, atomically: the
    shipped pretrained build where there is one, else the family's random build."""
    family = TINY_FAMILIES[name]

    def write(staging: Path) -> None:
        shipped = _SHIPPED / name
        if (shipped / "model.safetensors").exists():
            # A tiny base pretrained once on cover captions, with its tokenizer and processor
            # (alignment/models/pretrain.py).
            for file in shipped.iterdir():
                shutil.copy2(file, staging / file.name)
            return
        family.build_tiny(name, staging)

    _build_atomically(name, folder, write)


def _asset_key(name: str) -> str:
    """Which build a tiny name means: the shipped pretrained weights' hash, or random init."""
    import hashlib

    weights = _SHIPPED / name / "model.safetensors"
    if not weights.exists():
        return "random"
    return hashlib.sha1(weights.read_bytes()).hexdigest()[:12]


STANDIN_VERSION = "v1"  # bump when a stand-in's build changes: cached folders are rebuilt


def _build_standin(name: str, folder: Path) -> None:
    """Build real-geometry stand-in `name` (alignment/models/standins.py) into `folder`, atomically."""
    from alignment.models.standins import build_standin

    _build_atomically(name, folder, lambda staging: build_standin(name, staging))


def resolve_model_path(name_or_path: str) -> str:
    """A tiny model's or stand-in's cached folder (built on first use), a local folder, or a hub id."""
    from alignment.models.standins import STANDINS

    if name_or_path in STANDINS:
        folder = cache_root() / "models" / f"{name_or_path}-{STANDIN_VERSION}"
        if not (folder / _COMPLETE).exists():
            _build_standin(name_or_path, folder)
        return str(folder)
    if name_or_path in TINY_MODELS:
        folder = cache_root() / "models" / f"{name_or_path}-{_asset_key(name_or_path)}"
        if not (folder / _COMPLETE).exists():
            _build_tiny(name_or_path, folder)
        return str(folder)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {path} has no config.json")
        return str(path)
    if name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder {name_or_path} does not exist")
    return name_or_path


class ModelAccessError(RuntimeError):
    """A hub model could not be loaded (offline, gated, missing); the message names the model and the remedy."""


def hub_error(name: str, error: BaseException) -> ModelAccessError:
    """One line for a failed hub load: what went wrong with model `name`, and what to do."""
    chain, cause = [], error
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    kinds = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain).lower()
    local = "or pass model.name=<local folder> holding the checkpoint"
    if "GatedRepoError" in kinds or "gated repo" in text or "restricted" in text:
        reason = (f"model {name!r} is gated on the Hugging Face Hub: accept its licence on its Hub page, log in "
                  f"(`hf auth login` or HF_TOKEN), {local}")
    elif "RepositoryNotFoundError" in kinds or "not a valid model identifier" in text or "404" in text:
        reason = (f"model {name!r} is neither a local folder nor a Hub repository you can see: check the name "
                  f"(private repos need a login: `hf auth login` or HF_TOKEN), {local}")
    elif "LocalEntryNotFoundError" in kinds or "couldn't connect" in text or "offline" in text:
        reason = (f"model {name!r} is not in the local Hub cache and the Hub cannot be reached "
                  f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}): download it where there is a network "
                  f"(`hf download {name}`) and run with HF_HUB_OFFLINE=1, {local}")
    else:
        reason = f"model {name!r} could not be loaded: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
    return ModelAccessError(reason)


def _from_hub(name: str, load):
    """`load()`, with a hub failure for a hub id turned into one `ModelAccessError` line."""
    import logging

    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retry warnings would precede the one line below
    try:
        return load()
    except OSError as error:
        if Path(name).expanduser().exists():
            raise
        raise hub_error(name, error) from error
    finally:
        hub_logger.setLevel(level)


def read_chat_template(path: str) -> str:
    """The Jinja text of a chat template file: a `.jinja` (or any text) file, or a `chat_template.json`
    (`{"chat_template": "..."}`, as checkpoints ship it)."""
    import json

    file = Path(path).expanduser()
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".json":
        from alignment.errors import ConfigError

        template = json.loads(text).get("chat_template") if text.strip().startswith("{") else None
        if not isinstance(template, str):
            raise ConfigError(f"model.chat_template: {file} has no \"chat_template\" string")
        return template
    return text


def apply_chat_template_file(processor, path: str | None) -> None:
    """Use the chat template in file `path` (`read_chat_template`) as the processor's and its tokenizer's, in
    place of the checkpoint's (recipe key `model.chat_template`); nothing for None. Prompt formats already
    read off the processor (`alignment.data.prompts.prompt_format`'s cache) are dropped."""
    if path is None:
        return
    template = read_chat_template(path)
    processor.chat_template = template
    processor.tokenizer.chat_template = template
    vars(processor).pop("_vlm_align_prompt_formats", None)


def load_processor(name_or_path: str, trust_remote_code: bool = False, min_pixels: int | None = None,
                   max_pixels: int | None = None, chat_template: str | None = None):
    """The model's processor (tokenizer + image processor), through its family's `load_processor` where it
    has one (Qwen: video-free without torchvision; `min_pixels`/`max_pixels` its pixel budget); a pad token
    always (right padding by default); the chat template of file `chat_template` in place of its own where given."""
    from transformers import AutoConfig, AutoProcessor

    path = resolve_model_path(name_or_path)
    config = _from_hub(name_or_path, lambda: AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))
    family = family_of(config)
    if hasattr(family, "load_processor"):
        processor = _from_hub(name_or_path, lambda: family.load_processor(
            path, trust_remote_code=trust_remote_code, min_pixels=min_pixels, max_pixels=max_pixels))
    else:
        if min_pixels is not None or max_pixels is not None:
            raise UnsupportedModelError(f"model.min_pixels / model.max_pixels: the {config.model_type} family has a "
                                        "fixed image size; leave them unset")
        processor = _from_hub(name_or_path, lambda: AutoProcessor.from_pretrained(
            path, trust_remote_code=trust_remote_code))
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|finetune_right_pad_id|>" if "<|finetune_right_pad_id|>" in tokenizer.get_vocab() else tokenizer.eos_token
    apply_chat_template_file(processor, chat_template)
    return processor


def quantization_config(family: ModuleType, quantization: str, compute_dtype: torch.dtype):
    """bitsandbytes settings: NF4 with double quantisation, or 8-bit; vision, projector, lm_head kept."""
    from transformers import BitsAndBytesConfig

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization == "none":
        return None
    if quantization == "8bit":
        if not family.SUPPORTS_8BIT:
            raise ValueError(f"8-bit quantization is not supported for the {family.__name__.split('.')[-1]} family; use 4bit")
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=family.QUANT_SKIP_MODULES)
    from transformers.integrations import is_deepspeed_zero3_enabled

    # ZeRO-3 partitions parameters of one floating dtype: the packed NF4 weights are stored as the
    # compute dtype then (same bytes), so that DeepSpeed can split them with the rest.
    storage = {"bnb_4bit_quant_storage": compute_dtype} if is_deepspeed_zero3_enabled() else {}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=family.QUANT_SKIP_MODULES,
        **storage,
    )


def load_model(
    name_or_path: str,
    quantization: str = "none",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    device_map=None,
):
    """Load an image-text-to-text model; `quantization` in none | 4bit | 8bit (NF4, double quant)."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.integrations import is_deepspeed_zero3_enabled

    path = resolve_model_path(name_or_path)
    config = _from_hub(name_or_path, lambda: AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))
    family = family_of(config)
    kwargs = {}
    quant = quantization_config(family, quantization, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if quant is not None and not is_deepspeed_zero3_enabled():  # ZeRO-3 places the weights itself
        kwargs["device_map"] = device_map or ({"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"})
    elif device_map is not None:
        kwargs["device_map"] = device_map
    # Loading leaves the RNG as it found it: under DeepSpeed ZeRO-3 transformers initialises the
    # partitioned weights randomly before loading them, which would change every adapter's init after.
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), without_library_progress_bars():
        model = _from_hub(name_or_path, lambda: AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs))
    if quant is not None:
        keep_four_bit_weights_unpacked(model)
    return model


def keep_four_bit_weights_unpacked(model) -> int:
    """Turn off bitsandbytes' CPU repacking of 4-bit weights; returns how many layers it touched.

    On a CPU with AVX512-BF16, a 4-bit layer's first forward in eval mode without gradients
    replaces its weight's data by a repacked layout for an inference kernel, for good. Training
    after such a forward (DPO after SFT's evaluation, PPO and GRPO after every rollout) then
    backpropagates through that kernel: on tiny-mllama the LoRA gradients after one evaluation pass
    differed from those before it by 114% (relative norm; tiny-llava alike). Under ZeRO-3 the
    repacked bytes replace a gathered partition and the next `state_dict()` fails in bitsandbytes.
    Unpacked weights take bitsandbytes' generic CPU path in every mode, as in training.
    """
    from bitsandbytes.nn import Linear4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)
