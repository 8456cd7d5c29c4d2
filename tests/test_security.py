"""Security: safetensors weights, weights_only optimizer/RNG loads (a planted pickle does not run),
torch >= 2.6, trust_remote_code off unless the recipe sets it, YAML through safe_load, no eval/exec.

Image paths are confined to the data folder: tests/test_data_validate.py::test_path_escaping_the_folder
(`..`, absolute paths, symlinks) and tests/test_reliability.py::test_catalogue_data_rows.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from alignment import check_torch_version
from alignment.config import ConfigError
from alignment.recipe import apply_override, load_recipe, recipe_from_dict
from alignment.stages import checkpoint as ckpt
from tests._toy_stage import toy_stage

ROOT = Path(__file__).resolve().parent.parent


class Planted:
    """A pickle payload: unpickling it calls open(marker, "w"), i.e. creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("name", ["optimizer.pt", "rng-rank0.pt"])
def test_planted_pickle_in_a_complete_checkpoint_does_not_run(tmp_path, name):
    toy_stage(tmp_path, max_steps=2).train()
    folder = tmp_path / "toy/checkpoints/step-000002"
    marker = tmp_path / "pwned"
    torch.save({"state": Planted(marker)}, folder / name)
    (folder / "manifest.json").unlink()
    ckpt.write_manifest(folder)  # the attacker rewrites the manifest too: the checkpoint looks complete
    assert ckpt.latest_checkpoint(folder.parent) == folder
    with pytest.raises(ckpt.CheckpointError, match=rf"{name} cannot be loaded safely \(UnpicklingError: .*"
                                                   rf"delete .*step-000002 to resume from an older checkpoint"):
        toy_stage(tmp_path, resume=True, max_steps=2).train()
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it
    torch.load(folder / name, weights_only=False)
    assert marker.exists()


def test_torch_older_than_2_6_is_refused():
    for ok in ("2.6.0", "2.13.0+cpu", "3.0.1", "2.7.0a0+git1234"):
        check_torch_version(ok)
    with pytest.raises(ImportError, match=r"vlm-align needs torch >= 2.6 .*found torch 2.5.1\+cu121. Upgrade torch"):
        check_torch_version("2.5.1+cu121")
    # at import of `alignment`, from the installed version (no torch import needed)
    code = ("import importlib.metadata as m; real = m.version; "
            "m.version = lambda name: '2.4.0' if name == 'torch' else real(name); import alignment")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode != 0 and "ImportError: vlm-align needs torch >= 2.6" in result.stderr


class _Stop(Exception):
    pass


def test_trust_remote_code_is_false_unless_the_recipe_sets_it(tmp_path, monkeypatch):
    import transformers

    from alignment.models import registry
    from alignment.policy import MultimodalPolicy
    from alignment.recipe import run_recipe

    seen = []
    real_config = transformers.AutoConfig.from_pretrained

    def config(path, **kwargs):
        seen.append(("config", kwargs["trust_remote_code"]))
        return real_config(path, **kwargs)

    def model(path, **kwargs):
        seen.append(("model", kwargs["trust_remote_code"]))
        raise _Stop

    def processor(path, **kwargs):
        seen.append(("processor", kwargs["trust_remote_code"]))
        raise _Stop

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", config)
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", model)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", processor)
    for call in (registry.load_model, registry.load_processor):
        with pytest.raises(_Stop):
            call("tiny-mllama")
    assert seen == [("config", False), ("model", False), ("config", False), ("processor", False)]

    asked = []

    def from_pretrained(name, **kwargs):
        asked.append(kwargs["trust_remote_code"])
        raise _Stop

    monkeypatch.setattr(MultimodalPolicy, "from_pretrained", from_pretrained)
    for model_config, expected in (({}, False), ({"trust_remote_code": True}, True)):
        recipe = recipe_from_dict({"output_dir": str(tmp_path / "out"), "model": model_config,
                                   "stages": [{"type": "sft"}]})
        with pytest.raises(_Stop):
            run_recipe(recipe)
        assert asked[-1] is expected


def test_yaml_python_tags_are_refused(tmp_path, capsys):
    from alignment.cli import train_main

    marker = tmp_path / "pwned"
    path = tmp_path / "r.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\nstages:\n  - type: sft\n")
    with pytest.raises(ConfigError, match=r"r.yaml: not valid YAML \(could not determine a constructor"):
        load_recipe(path)
    assert train_main([str(path)]) == 2 and "error: " in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not a valid YAML value"):
        apply_override({"stages": [{"type": "sft"}]}, f"name=!!python/object/apply:os.system ['touch {marker}']")
    assert not marker.exists()
    with pytest.raises(yaml.constructor.ConstructorError):  # what an unsafe loader would have run
        yaml.safe_load("!!python/object/apply:os.system ['true']")


UNSAFE_CALLS = {"eval", "exec", "compile", "execfile"}
UNSAFE_ATTRIBUTES = {("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"), ("pickle", "load"),
                     ("pickle", "loads"), ("marshal", "loads"), ("dill", "load")}


def _sources():
    return sorted((ROOT / "alignment").rglob("*.py")) + sorted((ROOT / "launch").rglob("*.py"))


def test_no_eval_exec_pickle_or_unsafe_load_in_the_library():
    """No eval/exec of recipe values, no unsafe YAML or pickle loads, torch.load only with weights_only=True,
    no trust_remote_code=True written into the code."""
    problems = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            func = node.func
            if isinstance(func, ast.Name) and func.id in UNSAFE_CALLS:
                problems.append(f"{where} {func.id}()")
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                if (func.value.id, func.attr) in UNSAFE_ATTRIBUTES:
                    problems.append(f"{where} {func.value.id}.{func.attr}()")
                if (func.value.id, func.attr) == ("torch", "load"):
                    weights_only = [k.value for k in node.keywords if k.arg == "weights_only"]
                    if not (weights_only and isinstance(weights_only[0], ast.Constant) and weights_only[0].value is True):
                        problems.append(f"{where} torch.load without weights_only=True")
            for keyword in node.keywords:
                if keyword.arg == "trust_remote_code" and isinstance(keyword.value, ast.Constant) and keyword.value.value:
                    problems.append(f"{where} trust_remote_code=True")
    assert not problems, problems
    assert "yaml.safe_load" in (ROOT / "alignment" / "recipe.py").read_text()


def test_weights_are_written_and_read_only_as_safetensors(tmp_path):
    from alignment.policy import ADAPTER_FILE, LoraSpec, MultimodalPolicy

    policy = MultimodalPolicy.from_pretrained("tiny-mllama")
    policy.add_adapter("policy", LoraSpec(r=2, alpha=4))
    policy.save_adapter("policy", tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json", ADAPTER_FILE]
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text((tmp_path / "adapter/adapter_config.json").read_text())
    torch.save({}, tmp_path / "pickled" / "adapter_model.bin")  # PEFT's pickle format is not read
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        policy.load_adapter("other", tmp_path / "pickled")
    # a checkpoint holds safetensors adapters; its .pt files are read by ckpt.safe_load (weights_only)
    toy_stage(tmp_path / "run", max_steps=1).train()
    files = {p.suffix for p in (tmp_path / "run/toy/checkpoints/step-000001").rglob("*") if p.is_file()}
    assert files == {".safetensors", ".pt", ".json"}
