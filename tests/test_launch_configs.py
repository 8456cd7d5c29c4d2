"""Launch configs: every YAML/JSON under launch/ parses and says what a launcher needs; the SLURM
script starts one `accelerate launch` per node with that node's rank."""

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
ACCELERATE_CONFIGS = sorted(p for p in LAUNCH.rglob("*.yaml"))
DEEPSPEED_CONFIGS = sorted(LAUNCH.rglob("*.json"))
SBATCH = LAUNCH / "multinode" / "slurm_multinode.sbatch"


def _ids(paths):
    return [str(p.relative_to(LAUNCH)) for p in paths]


def _autos(node, where=""):
    """Dotted paths of every "auto" value in a JSON tree."""
    if isinstance(node, dict):
        return [a for k, v in node.items() for a in _autos(v, f"{where}.{k}".lstrip("."))]
    if isinstance(node, list):
        return [a for i, v in enumerate(node) for a in _autos(v, f"{where}.{i}")]
    return [where] if node == "auto" else []


def test_the_multinode_files_exist():
    assert (LAUNCH / "multinode" / "multinode_zero3.yaml").is_file()
    assert SBATCH.is_file()
    assert ACCELERATE_CONFIGS and DEEPSPEED_CONFIGS


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=_ids(ACCELERATE_CONFIGS))
def test_accelerate_config(path):
    from accelerate.commands.config.config_args import load_config_from_file

    raw = yaml.safe_load(path.read_text())
    config = load_config_from_file(str(path))  # accelerate's own parser: unknown keys are refused
    machines, processes = raw["num_machines"], raw["num_processes"]
    assert isinstance(machines, int) and isinstance(processes, int) and machines >= 1
    assert processes >= machines and processes % machines == 0, "num_processes counts all processes of the job"
    assert config.num_machines == machines
    if machines > 1:
        for key in ("machine_rank", "main_process_ip", "main_process_port", "rdzv_backend"):
            assert key in raw, f"a multi-machine config needs {key}"
        assert raw["machine_rank"] == 0 and raw["same_network"] is True
    if raw["distributed_type"] == "DEEPSPEED":
        ds = raw["deepspeed_config"]
        file = ROOT / ds["deepspeed_config_file"]  # relative to the repo root, where launches run
        assert file.is_file(), f"{path.name}: {ds['deepspeed_config_file']} does not exist"
        expected_stage = 3 if "zero3" in path.name else 2 if "zero2" in path.name else None
        if expected_stage is not None:
            assert json.loads(file.read_text())["zero_optimization"]["stage"] == expected_stage
        # With a DeepSpeed file, precision and accumulation come from it, not from the YAML.
        assert "mixed_precision" not in raw and "gradient_accumulation_steps" not in ds
        if machines > 1:
            assert ds["deepspeed_multinode_launcher"] == "standard"


@pytest.mark.parametrize("path", DEEPSPEED_CONFIGS, ids=_ids(DEEPSPEED_CONFIGS))
def test_deepspeed_config(path):
    config = json.loads(path.read_text())
    stage = config["zero_optimization"]["stage"]
    assert stage in (0, 1, 2, 3)
    if "zero3" in path.name or "zero2" in path.name:
        assert stage == int(path.stem[-1])
    # One source of truth: what the recipe decides is "auto" here and filled from the recipe's stage
    # (alignment.stages.engine.fill_deepspeed_config); the JSON keeps what only DeepSpeed knows.
    assert sorted(_autos(config)) == ["bf16.enabled", "gradient_accumulation_steps", "gradient_clipping",
                                      "train_micro_batch_size_per_gpu"]
    if stage == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_sbatch_essentials():
    text = SBATCH.read_text()
    assert text.startswith("#!/bin/bash\n")
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    for needed in ("--nodes=", "--ntasks-per-node=1", "--gpus-per-node="):
        assert any(needed in d for d in directives), needed
    assert "set -euo pipefail" in text
    assert "scontrol show hostnames" in text and "srun" in text
    for flag in ('--machine_rank "$SLURM_NODEID"', '--num_machines "$SLURM_NNODES"', "--main_process_ip",
                 "-m alignment.cli train"):
        assert flag in text, flag
    default = text.split("ACCELERATE_CONFIG:-", 1)[1].split("}", 1)[0]
    assert (ROOT / default).is_file()
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)


def _fake_bin(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_sbatch_launches_each_node_with_its_rank(tmp_path):
    """Run the script with stand-ins for scontrol, srun (two nodes) and accelerate: each node's
    `accelerate launch` gets the job's totals, its own rank and the first host as master."""
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
    bin_dir.mkdir()
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    log = tmp_path / "calls.log"
    _fake_bin(bin_dir, "scontrol", 'printf "gpu-a\\ngpu-b\\n"\n')
    # srun: run the task once per node, as SLURM would, with SLURM_NODEID set.
    _fake_bin(bin_dir, "srun", 'while [[ $1 == --* ]]; do shift; done\n'
                               'for node in 0 1; do SLURM_NODEID=$node "$@"; done\n')
    _fake_bin(bin_dir, "accelerate", f'echo "$*" >> {log}\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(ROOT),
           "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-[a-b]", "GPUS_PER_NODE": "4", "VENV": str(venv)}
    env.pop("SLURM_NODEID", None)
    result = subprocess.run(["bash", str(SBATCH), "recipes/dpo_bookcover.yaml", "output_dir=/shared/x"],
                            env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 2
    for rank, call in enumerate(calls):
        assert call.startswith("launch --config_file launch/multinode/multinode_zero3.yaml")
        assert f"--num_machines 2 --num_processes 8 --machine_rank {rank}" in call
        assert "--main_process_ip gpu-a --main_process_port 29500" in call
        assert call.endswith("-m alignment.cli train recipes/dpo_bookcover.yaml output_dir=/shared/x")
    usage = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr
