"""Adapters on disk and between roles: save, load and copy the adapters of a `MultimodalPolicy`.

A saved adapter is a folder in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`), plus
`head.safetensors` for a role with a scalar head (critic, reward), `adapter_method.json` for a PEFT adapter whose
menu method is not plain lora, and the base weights a `projector` stage trained in full
(`base_weights.safetensors` + `base_weights.json`), which travel with every adapter saved after them.

A mixin of `MultimodalPolicy` (the state it uses is listed in `alignment.policy.roles`).
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import torch
from torch import nn

from alignment.adapters.base import read_config
from alignment.adapters.menu import method_of_peft_type
from alignment.adapters.spec import LoraSpec
from alignment.files import save_safetensors
from alignment.policy.roles import PEFT_TYPES

ADAPTER_FILE = "adapter_model.safetensors"
HEAD_FILE = "head.safetensors"
METHOD_FILE = "adapter_method.json"  # the menu method of a PEFT adapter that is not plain lora
BASE_WEIGHTS_FILE = "base_weights.safetensors"  # base weights trained in full (projector stage), carried along
BASE_WEIGHTS_CONFIG = "base_weights.json"
TUNER_KEY = re.compile(r"lora_|ia3_|hada_")
OWN_FIELDS = ("dim", "groups", "scale", "dropout", "preset", "visual_dim", "num_virtual_tokens", "prefix_projection",
              "target_modules")  # the `LoraSpec` fields an own method's saved config carries


def saved_method(folder: str | Path) -> str:
    """The menu method of a saved adapter folder: an own method by its `peft_type`, a PEFT one by its
    METHOD_FILE, else read off the PEFT config (DoRA, IA3, LoHa, else lora)."""
    folder = Path(folder)
    saved = read_config(folder)
    own = method_of_peft_type(saved.get("peft_type", ""))
    if own is not None:
        return own
    if (folder / METHOD_FILE).exists():
        return json.loads((folder / METHOD_FILE).read_text())["method"]
    if saved.get("use_dora"):
        return "dora"
    return {v: k for k, v in PEFT_TYPES.items()}.get(saved.get("peft_type") or "LORA", "lora")


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Tensors to a safetensors file with the mode of every other file of the run (`alignment.files`)."""
    save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path)


class AdapterFiles:
    """Save, load and copy named adapters; see the module docstring."""

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
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        own = self._own_of(name)
        if own is not None:
            own.save(name, folder)
        else:
            self.model.peft_config[name].save_pretrained(str(folder))
            _save_tensors(self._peft_state(name), folder / ADAPTER_FILE)
            method = self.adapter_methods.get(name, "lora")
            if method != "lora":
                (folder / METHOD_FILE).write_text(json.dumps({"method": method}))
        base = self.own["base_weights"] if "base_weights" in self.own else None
        if base is not None and own is not base:
            (base_name,) = base.names
            _save_tensors(base.state_of(base_name), folder / BASE_WEIGHTS_FILE)
            (folder / BASE_WEIGHTS_CONFIG).write_text(json.dumps({"name": base_name, **base.configs[base_name]}))
        if name in self.heads:
            _save_tensors(self.heads[name].state_dict(), folder / HEAD_FILE)
        return folder

    def load_adapter(self, name: str, folder: str | Path, trainable: bool = True) -> None:
        """Load (or overwrite) adapter `name` from a folder written by `save_adapter` or PEFT."""
        from peft import PeftConfig, set_peft_model_state_dict
        from safetensors.torch import load_file

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
                fields = {k: saved[k] for k in OWN_FIELDS if k in saved}
                self.add_adapter(name, LoraSpec(method=own_method, **fields), trainable=trainable)
            self._own_of(name).load_state_of(name, state, str(folder))
        else:
            if name not in self.adapters:
                self._add_peft(name, PeftConfig.from_pretrained(str(folder)))
                self.adapter_methods[name] = saved_method(folder)
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
