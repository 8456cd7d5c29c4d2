"""A toy stage on the real loop (`Stage.train`): one 4-vector "adapter", no model, milliseconds a step.

Reliability and security tests use it to drive the loop's checkpoint, resume, non-finite and
empty-batch paths without loading a VLM.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alignment.config import StageConfig
from alignment.stages.base import RunContext, Stage


class ToyAccelerator:
    process_index, num_processes, is_main_process = 0, 1, True
    device = torch.device("cpu")

    def wait_for_everyone(self):
        pass

    def autocast(self):
        return contextlib.nullcontext()


class ToyPolicy:
    """One trainable adapter `policy` (a 4-vector), saved as safetensors like `MultimodalPolicy`."""

    def __init__(self):
        self.w = torch.nn.Parameter(torch.zeros(4))
        self.trainable_adapters = {"policy"}

    def trainable_parameters(self):
        return [self.w]

    def train(self):
        pass

    def eval(self):
        pass

    def save_adapter(self, name, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file({"w": self.w.detach().clone()}, str(Path(folder) / "adapter_model.safetensors"))

    def load_adapter(self, name, folder):
        with torch.no_grad():
            self.w.copy_(load_file(str(Path(folder) / "adapter_model.safetensors"))["w"])


class ToyStage(Stage):
    """Loss: sum over the batch of mask * |w - x|^2. `nan_calls` / `masked_calls`: 1-based
    train_step / collate calls whose loss is NaN / whose every label is masked."""

    type = "toy"

    def __init__(self, *args, nan_calls=(), masked_calls=(), on_call=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_calls, self.masked_calls, self.on_call = set(nan_calls), set(masked_calls), on_call
        self.calls = self.collates = 0

    def setup(self, previous_adapter):
        pass

    def collate(self, examples):
        self.collates += 1
        mask = torch.zeros(len(examples)) if self.collates in self.masked_calls else torch.ones(len(examples))
        return {"ids": [e["id"] for e in examples], "x": torch.stack([e["x"] for e in examples]), "mask": mask}

    def count(self, batch):
        return int(batch["mask"].sum())

    def train_step(self, batch):
        self.calls += 1
        if self.on_call is not None:
            self.on_call(self.calls)
        loss = (((self.policy.w - batch["x"]) ** 2).sum(-1) * batch["mask"]).sum()
        if self.calls in self.nan_calls:
            loss = loss * float("nan")
        return loss, {}

    def evaluate(self):
        return {}


def toy_examples(n=12):
    generator = torch.Generator().manual_seed(0)
    return [{"id": f"e{i}", "x": torch.randn(4, generator=generator)} for i in range(n)]


def toy_stage(out, resume=False, fingerprint=None, policy=None, **kwargs) -> ToyStage:
    """A toy stage writing under `out/toy/`; StageConfig fields and ToyStage options as kwargs."""
    options = {k: kwargs.pop(k) for k in ("nan_calls", "masked_calls", "on_call") if k in kwargs}
    config = StageConfig(**{"name": "toy", "type": "toy", "max_steps": 6, "batch_size": 2, "save_every": 2,
                            "lr": 0.1, "lr_schedule": "constant", "log_every": 100, **kwargs})
    ctx = RunContext(accelerator=ToyAccelerator(), output_dir=Path(out), seed=0, resume=resume,
                     fingerprint=fingerprint or {"batch_size": config.batch_size, "world_size": 1})
    return ToyStage(config, policy or ToyPolicy(), ctx, toy_examples(), [], **options)
