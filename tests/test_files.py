"""alignment.files: safetensors files get the permissions every other file of a run gets."""

import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from alignment.files import save_safetensors


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_safetensors_files_follow_the_umask_like_other_files(umask, tmp_path):
    previous = os.umask(umask)
    try:
        (tmp_path / "report.json").write_text("{}")
        path = save_safetensors({"w": torch.arange(3.0)}, tmp_path / "adapter_model.safetensors")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o666 & ~umask
    assert load_file(str(path))["w"].tolist() == [0.0, 1.0, 2.0]
