"""Generation, a room of its own: the rollout engines behind one small interface.

An engine turns a batch of left-padded prompts (and their images) into new tokens under the policy's active
adapter. Every engine answers the same call::

    engine.generate(policy, batch, max_new_tokens=16, temperature=0.0, top_p=1.0, image_features=None,
                    generator=None, num_samples=1) -> tokens [B*G, L]

where rows p*G .. p*G + G-1 continue prompt p, a row holds the pad id after its stop token, temperature 0 is
greedy, and `generator` is one torch.Generator for the batch or one per answer row. The engine may read of the
policy: `model`, `family`, `processor`, `device`, `synced_generation`, `features_of`, `image_index`,
`token_inputs`, `stop_token_ids()` and `unsampled_token_ids(vocab_size)`.

`loop` (`loop.py`) is the step-by-step sampler over transformers' dynamic KV cache. A faster engine (a static
cache with a compiled decode step, or vLLM) is one more class here, registered in `ENGINES`.
"""

from __future__ import annotations

from typing import Protocol

from alignment.generation.loop import LoopEngine
from alignment.generation.sampling import all_finished, sample_tokens
from alignment.generation.stops import decode_answers, stop_token_ids, unsampled_token_ids


class GenerationEngine(Protocol):
    """What every engine implements (see the module docstring)."""

    name: str

    def generate(self, policy, batch: dict, max_new_tokens: int = 16, temperature: float = 0.0,
                 top_p: float = 1.0, image_features=None, generator=None, num_samples: int = 1): ...


ENGINES: dict[str, type] = {"loop": LoopEngine}


def make_engine(name: str = "loop") -> GenerationEngine:
    """The engine registered as `name`."""
    if name not in ENGINES:
        raise ValueError(f"generation engine must be one of {sorted(ENGINES)}, got {name!r}")
    return ENGINES[name]()


__all__ = ["ENGINES", "GenerationEngine", "LoopEngine", "all_finished", "decode_answers", "make_engine",
           "sample_tokens", "stop_token_ids", "unsampled_token_ids"]
