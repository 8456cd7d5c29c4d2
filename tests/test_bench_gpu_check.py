"""bench/gpu_check.py (issue 16's GPU check) at the stand-in's width on the CPU, so that the script a
GPU session runs is never untested. Slow (about 30 s alone); its fast variant in the default suite is
tests/test_standin_recipes.py, which runs the same 11B recipe settings on the same stand-in."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_runs_at_small_width_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--width", "small", "--out", str(out),
                           "--workdir", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())["results"]
    assert result["dpo"]["loss_first"] == pytest.approx(0.6931472, abs=1e-5)  # policy == reference at step 0
    assert result["dpo"]["batch"]["tiles_used"] == 4 and result["dpo"]["batch"]["vision_tokens_per_image"] == 6404
    assert result["ppo"]["peak_memory_mb"] > 0 and result["ppo"]["s_per_step"] > 0
