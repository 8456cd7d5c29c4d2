"""A deterministic, resumable stream of micro-batches over a list of examples.

Micro-batch g of the whole run covers, in epoch e's seeded permutation, the slots of global batch
g * world_size + rank. Its position is one integer, so a resumed run sees every example exactly as
often as an uninterrupted one. Each example drawn has a draw number (epoch * len(examples) + its slot in
that epoch's permutation) that is the same whatever the number of processes: online stages seed each
example's sampling with it, so 2 processes sample what 1 process with twice the batch samples.
"""

from __future__ import annotations

import torch


class ExampleStream:
    def __init__(self, examples: list, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if len(examples) < batch_size * world_size:
            raise ValueError(
                f"{len(examples)} training examples are fewer than one batch "
                f"({batch_size} per process x {world_size} processes); lower batch_size or add data"
            )
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.position = 0  # index of the next micro-batch of this rank
        self.batches_per_epoch = len(examples) // (batch_size * world_size)
        self._order: tuple[int, list[int]] | None = None

    def _permutation(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.examples), generator=generator).tolist())
        return self._order[1]

    def next_batch(self) -> list:
        return self.next_numbered_batch()[0]

    def next_numbered_batch(self) -> tuple[list, list[int]]:
        """This process's next micro-batch: (examples, their draw numbers)."""
        epoch, within = divmod(self.position, self.batches_per_epoch)
        start = (within * self.world_size + self.rank) * self.batch_size
        indices = self._permutation(epoch)[start : start + self.batch_size]
        self.position += 1
        draws = [epoch * len(self.examples) + start + i for i in range(len(indices))]
        return [self.examples[i] for i in indices], draws

    def next_numbered_batches(self, count: int) -> tuple[list, list[int]]:
        """`count` micro-batches in one list: (examples, their draw numbers)."""
        examples, draws = [], []
        for _ in range(count):
            batch, numbers = self.next_numbered_batch()
            examples += batch
            draws += numbers
        return examples, draws

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "num_examples": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("batch_size", "world_size", "num_examples"):
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise ValueError(
                    f"checkpoint was written with {key}={state[key]} but this run has {key}={mine}; "
                    "resume with the same recipe, batch size and number of processes, or start a new output_dir"
                )
        self.position = state["position"]
