"""Merge a stage's LoRA adapter into its base model: a standard transformers checkpoint.

    merge_adapter("tiny-mllama", "outputs/dpo_bookcover/dpo", "merged/", dtype="bf16")

The base is loaded unquantised in the target dtype (a 4-bit QLoRA run merges into the original
full-precision weights: bitsandbytes' NF4 weights cannot be saved as a plain checkpoint), the adapter
is loaded on it and folded in (`merge_and_unload`), and model, generation config and processor
(tokenizer, image processor, chat template) are written together. The folder then loads with
`AutoModelForImageTextToText.from_pretrained(out)` and `AutoProcessor.from_pretrained(out)` alone,
which is what vLLM and TGI read.

The adapter of a DPO or PPO stage is the whole policy adapter (DPO continues SFT's adapter), so the
last policy stage's folder alone is what to merge.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
MERGE_INFO = "vlm_align_merge.json"
PROMPT_FILE = "vlm_align_prompt.json"  # the instruction and the prompt the run trained with
CARD_FILE = "README.md"
SAMPLE_QUESTION = "Who wrote this book?"


class MergeError(ValueError):
    """The adapter cannot be merged as asked; the message says why and what to do."""


def merge_adapter(model_name: str, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  dtype: str = "bf16", trust_remote_code: bool = False, overwrite: bool = False,
                  instruction: str | None = None, max_new_tokens: int | None = None,
                  chat_template: str | None = None) -> Path:
    """Write base `model_name` + the LoRA adapter in `adapter_dir`, merged, to `out_dir` (atomically).

    The folder carries what generation needs beside the weights, so that plain transformers answers as
    `vlm-align generate` does: the prompt the run trained with (`PROMPT_FILE`: its instruction and the rendered
    prompt with a `{question}` slot), a generation config with the run's stop tokens, the image placeholders
    suppressed and `max_new_tokens`, and a card (`README.md`) whose snippet runs as written."""
    import torch

    from alignment.policy import ADAPTER_FILE, HEAD_FILE, MultimodalPolicy

    if dtype not in DTYPES:
        raise MergeError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / ADAPTER_FILE).exists():
        raise FileNotFoundError(f"no {ADAPTER_FILE} in {adapter_dir}: not a finished stage's adapter folder")
    if (adapter_dir / HEAD_FILE).exists():
        raise MergeError(f"{adapter_dir} holds a reward model or critic (a LoRA adapter plus a scalar head), "
                         "not a policy; merge the folder of an sft, dpo, ppo or grpo stage")
    from alignment.adapters.base import read_config
    from alignment.adapters.menu import method_of_peft_type

    own_method = method_of_peft_type(read_config(adapter_dir).get("peft_type", ""))
    if own_method == "base_weights":
        raise MergeError(f"{adapter_dir} holds a projector stage's base weights; merge the folder of the stage "
                         "after it (its adapter carries them)")
    if own_method not in (None, "full"):
        raise MergeError(f"{adapter_dir} holds a {own_method} adapter, which lives beside the base weights and "
                         "does not merge into them; load it with the base (vlm-align eval / generate) instead")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MergeError(f"{out} exists and is not empty; choose a new folder (or pass --overwrite)")

    torch_dtype = getattr(torch, DTYPES[dtype])
    policy = MultimodalPolicy.from_pretrained(model_name, quantization="none", dtype=torch_dtype,
                                              trust_remote_code=trust_remote_code, chat_template=chat_template)
    policy.load_adapter("policy", adapter_dir, trainable=False)
    prompt = _prompt_record(policy, instruction)
    generation = _generation_settings(policy, max_new_tokens)
    # full fine-tuning's weights are the base's own once loaded: nothing to merge
    model = policy.base_model if own_method == "full" else policy.model.merge_and_unload(safe_merge=True)
    leftover = [n for n, _ in model.named_modules() if "lora_" in n]
    if leftover:
        raise RuntimeError(f"LoRA layers left after merging: {leftover[:3]}")
    model = model.to(torch_dtype)
    _restore_use_cache(model, model_name, trust_remote_code)
    for key, value in generation.items():
        setattr(model.generation_config, key, value)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's folder is private; the checkpoint is not
    try:
        model.save_pretrained(staging)
        policy.processor.save_pretrained(staging)
        info = {"base_model": model_name, "adapter": str(adapter_dir.resolve()), "dtype": DTYPES[dtype],
                "adapter_config": json.loads((adapter_dir / "adapter_config.json").read_text())}
        (staging / MERGE_INFO).write_text(json.dumps(info, indent=2, default=str))
        (staging / PROMPT_FILE).write_text(json.dumps(prompt, indent=2))
        (staging / CARD_FILE).write_text(merged_card(out, model_name, adapter_dir))
        for file in staging.iterdir():
            os.chmod(file, 0o666 & ~umask)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _prompt_record(policy, instruction: str | None) -> dict:
    """The prompt `vlm-align generate` renders, with a `{question}` slot: the book-cover prompt format through the
    model's chat template, the run's instruction included."""
    from alignment.data.catalog import DEFAULT_INSTRUCTION
    from alignment.data.prompts import prompt_format

    instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
    return {"instruction": instruction, "template": prompt_format(policy.processor).prompt("{question}", instruction),
            "add_special_tokens": False}


def _generation_settings(policy, max_new_tokens: int | None) -> dict:
    """Generation config fields that make `model.generate(**inputs)` greedy like the policy's sampler: its stop
    tokens as EOS, the image placeholders never sampled, the stage's budget."""
    vocab = policy.base_model.get_output_embeddings().weight.shape[0]
    settings = {"eos_token_id": sorted(policy.stop_token_ids()), "do_sample": False,
                "pad_token_id": policy.processor.tokenizer.pad_token_id,
                "suppress_tokens": policy.unsampled_token_ids(vocab) or None}
    if max_new_tokens is not None:
        settings["max_new_tokens"] = max_new_tokens
    return settings


def usage_snippet(folder: str | os.PathLike, image: str | os.PathLike | None = None,
                  question: str = SAMPLE_QUESTION) -> str:
    """Python that answers `question` about `image` with the merged `folder` and plain transformers, exactly as
    `vlm-align generate` does with the stage's adapter (greedy, same prompt, same stop tokens)."""
    from alignment.summary import sample_cover_path

    image = sample_cover_path() if image is None else image
    return f"""import json

from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

folder = {str(folder)!r}
model = AutoModelForImageTextToText.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder)
prompt = json.load(open(f"{{folder}}/{PROMPT_FILE}"))  # the run's instruction, in its chat template
image = Image.open({str(image)!r}).convert("RGB")
text = prompt["template"].replace("{{question}}", {question!r})
inputs = processor(text=text, images=[image], add_special_tokens=False, return_tensors="pt")
tokens = model.generate(**inputs)  # generation_config.json: greedy, the run's stop tokens and budget
print(processor.decode(tokens[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
"""


def merged_card(folder: Path, model_name: str, adapter_dir: Path) -> str:
    """The merged folder's README: what it is and the snippet that reproduces `vlm-align generate`."""
    return f"""# {folder.name}

`{model_name}` with the adapter of `{adapter_dir}` merged in by `vlm-align merge`: a plain transformers checkpoint.
`{PROMPT_FILE}` holds the instruction and the prompt the run trained with; the generation config holds its stop
tokens and answer budget. This answers as `vlm-align generate {adapter_dir} --image IMAGE --question QUESTION` does:

```python
{usage_snippet(folder)}```
"""


def _restore_use_cache(model, model_name: str, trust_remote_code: bool) -> None:
    """Undo `MultimodalPolicy`'s `config.use_cache = False` (set for training): the base's value, or none."""
    from transformers import AutoConfig

    from alignment.models import resolve_model_path

    original = AutoConfig.from_pretrained(resolve_model_path(model_name), trust_remote_code=trust_remote_code)
    if "use_cache" in original.to_dict():
        model.config.use_cache = original.use_cache
    else:
        vars(model.config).pop("use_cache", None)


__all__ = ["DTYPES", "PROMPT_FILE", "MergeError", "merge_adapter", "usage_snippet"]


def command(args) -> int:
    """`vlm-align merge RUN_DIR/STAGE OUT_DIR` (arguments from `alignment.cli`'s parser)."""
    import sys

    from alignment.runs import instruction_of, open_stage

    recipe, index, _ = open_stage(args.stage, args.recipe)
    if recipe.model.quantization != "none":
        print(f"note: the run trained on a {recipe.model.quantization} base; merging into the unquantised "
              f"base weights in {args.dtype}", file=sys.stderr)
    out = merge_adapter(recipe.model.name, args.stage, args.out_dir, dtype=args.dtype,
                        trust_remote_code=recipe.model.trust_remote_code, overwrite=args.overwrite,
                        instruction=instruction_of(recipe), max_new_tokens=recipe.stages[index].max_new_tokens,
                        chat_template=recipe.model.chat_template)
    print(f"merged {args.stage} into {recipe.model.name} ({args.dtype}): {out}")
    print(f"load it with AutoModelForImageTextToText.from_pretrained({str(out)!r}) and "
          f"AutoProcessor.from_pretrained({str(out)!r}); {out / CARD_FILE} shows how to prompt it")
    return 0
