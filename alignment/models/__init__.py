"""Model families, the built-in tiny models, and loading (tiny name, local folder or hub id).

`load_model("tiny-mllama", quantization="4bit")` and
`load_model("meta-llama/Llama-3.2-11B-Vision-Instruct", quantization="4bit")` run the same code:
a tiny name resolves to a folder built once (tokenizer, processor, config, weights) and cached.
"""

from alignment.models.registry import (
    FAMILIES,
    TINY_MODELS,
    cache_root,
    family_of,
    load_model,
    load_processor,
    resolve_model_path,
)

__all__ = [
    "FAMILIES",
    "TINY_MODELS",
    "cache_root",
    "family_of",
    "load_model",
    "load_processor",
    "resolve_model_path",
]
