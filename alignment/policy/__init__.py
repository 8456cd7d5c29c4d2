"""`MultimodalPolicy` and what travels with it: one base VLM with named adapters and heads.

| file               | job                                                                 |
| ------------------ | ------------------------------------------------------------------- |
| `multimodal.py`    | the class: loading, the model's facts, generation through an engine |
| `roles.py`         | the adapter registry: add, switch, freeze, the reference role        |
| `adapter_files.py` | adapters on disk and between roles: save, load, copy                |
| `scoring.py`       | image features, forwards, completion and pair log-probs, heads      |

`LoraSpec` and `resolve_preset` live in `alignment.adapters.spec` and are re-exported here.
"""

from alignment.adapters.spec import LoraSpec, resolve_preset
from alignment.policy.adapter_files import (
    ADAPTER_FILE,
    BASE_WEIGHTS_CONFIG,
    BASE_WEIGHTS_FILE,
    HEAD_FILE,
    METHOD_FILE,
    saved_method,
)
from alignment.policy.multimodal import MultimodalPolicy
from alignment.policy.roles import PEFT_TYPES, REFERENCE
from alignment.presets import PRESETS

__all__ = ["ADAPTER_FILE", "BASE_WEIGHTS_CONFIG", "BASE_WEIGHTS_FILE", "HEAD_FILE", "METHOD_FILE", "PEFT_TYPES",
           "PRESETS", "REFERENCE", "LoraSpec", "MultimodalPolicy", "resolve_preset", "saved_method"]
