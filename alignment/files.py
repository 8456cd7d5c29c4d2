"""Files of a run written with the permissions of every other file of it.

safetensors' `save_file` (0.8) creates its file with mode 0600 whatever the umask, so a run's adapters
were readable by their owner only while report.json, the card and the checkpoints' JSON beside them
follow the umask (0644 under the usual 022): a teammate, a serving process under another user or a
shared volume could read the metrics but not the weights. `save_safetensors` writes through
`save_file`, then gives the file the mode `open()` would have: 0666 minus the umask.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_plain_file(path: str | os.PathLike) -> None:
    """Give `path` the mode a newly created regular file gets (0666 & ~umask)."""
    os.chmod(path, 0o666 & ~current_umask())


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """`safetensors.torch.save_file(tensors, path, metadata)` with the mode of every other file of the run."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    as_plain_file(path)
    return Path(path)
