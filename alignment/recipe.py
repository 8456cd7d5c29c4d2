"""Recipes: YAML -> typed `RecipeConfig` (unknown keys rejected) -> stages chained in order.

    recipe = load_recipe("recipes/dpo_bookcover.yaml", ["output_dir=/tmp/x", "stages.1.beta=0.2"])
    report = run_recipe(recipe)
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path

import yaml

from alignment.config import (
    STAGE_CONFIGS,
    ConfigError,
    DataConfig,
    LoraConfig,
    ModelConfig,
    RecipeConfig,
    StageConfig,
)

# Renamed keys keep working for a while: old -> new (a FutureWarning names the replacement).
RENAMED_KEYS: dict[str, str] = {"gradient_accumulation_steps": "grad_accum", "learning_rate": "lr"}


# ----------------------------------------------------------------------------- parsing
def _build(cls, raw, where: str):
    """Dataclass `cls` from a mapping, checking keys and value types; `where` names the location."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    import warnings

    raw = dict(raw)
    for old, new in RENAMED_KEYS.items():
        if old in raw:
            warnings.warn(f"{where}.{old} is renamed {new}; the old key will stop working", FutureWarning, stacklevel=2)
            raw.setdefault(new, raw.pop(old))
    names = {f.name: f for f in dataclasses.fields(cls)}
    _refuse_unknown(set(raw) - set(names), names, where)
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        values[key] = _coerce(hints[key], value, f"{where}.{key}")
    try:
        return cls(**values)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def _did_you_mean(words, valid) -> str:
    """`; did you mean 'x'?` for the closest of `valid` (or of a renamed key's old name) to a misspelt word,
    `; did you mean 'x' for 'w'?` for each of several words; '' where nothing is close."""
    import difflib

    renamed = {old: new for old, new in RENAMED_KEYS.items() if new in valid}  # learning_rat -> learning_rate -> lr
    candidates = [str(v) for v in valid] + list(renamed)
    close = [difflib.get_close_matches(str(word), candidates, n=1, cutoff=0.6) for word in words]
    guesses = [(word, renamed.get(c[0], c[0])) for word, c in zip(words, close) if c]
    if len(words) == 1:
        return f"; did you mean {guesses[0][1]!r}?" if guesses else ""
    return "".join(f"; did you mean {new!r} for {str(word)!r}?" for word, new in guesses)


def _refuse_unknown(unknown: set, valid, where: str) -> None:
    """A `ConfigError` naming the unknown keys of section `where` ('' at the top), the valid keys, and a
    "did you mean" for misspellings."""
    if not unknown:
        return
    unknown = sorted(unknown, key=str)
    raise ConfigError(f"{where + ': ' if where else ''}unknown key(s) {unknown}; valid keys: {sorted(valid)}"
                      f"{_did_you_mean(unknown, valid)}")


def _coerce(hint, value, where: str):
    """Check (and gently convert) `value` against a type hint; nested dataclasses are built."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}.{i}") for i, v in enumerate(value)]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-3 as a string
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _stage(raw, index: int) -> StageConfig:
    where = f"stages.{index}"
    if not isinstance(raw, dict) or "type" not in raw:
        raise ConfigError(f"{where}: each stage needs a `type` ({' | '.join(STAGE_CONFIGS)})")
    kind = raw["type"]
    if kind not in STAGE_CONFIGS:
        raise ConfigError(f"{where}.type: unknown stage type {kind!r}; valid: {sorted(STAGE_CONFIGS)}"
                          f"{_did_you_mean([kind], STAGE_CONFIGS)}")
    return _build(STAGE_CONFIGS[kind], raw, where)


def recipe_from_dict(raw: dict, source: str = "<recipe>") -> RecipeConfig:
    try:
        if not isinstance(raw, dict):
            raise ConfigError(f"expected a mapping at the top level, got {type(raw).__name__}")
        raw = dict(raw)
        stages = raw.pop("stages", None)
        if not isinstance(stages, list) or not stages:
            raise ConfigError("stages: a recipe needs a non-empty list of stages")
        built = [_stage(s, i) for i, s in enumerate(stages)]
        names = {f.name for f in dataclasses.fields(RecipeConfig)}
        _refuse_unknown(set(raw) - names - {"stages"}, names, "")
        hints = typing.get_type_hints(RecipeConfig)
        values = {k: _coerce(hints[k], v, k) for k, v in raw.items()}
        recipe = RecipeConfig(**values, stages=built)
        _check_stage_order(recipe)
        from alignment.adapters.menu import check_recipe

        check_recipe(recipe)
        return recipe
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def _check_stage_order(recipe: RecipeConfig) -> None:
    types = [s.type for s in recipe.stages]
    for i, kind in enumerate(types):
        if kind == "ppo" and "reward" not in types[:i] and not getattr(recipe.stages[i], "reward_adapter", None):
            raise ConfigError(f"stages.{i}: a ppo stage needs a reward stage before it (or reward_adapter)")
        if (kind == "grpo" and recipe.stages[i].uses_reward_model and "reward" not in types[:i]
                and not recipe.stages[i].reward_adapter):
            raise ConfigError(f"stages.{i}: the reward_model reward needs a reward stage before it (or reward_adapter)")


def apply_override(raw: dict, override: str) -> None:
    """`a.b.0.c=value` (value parsed as YAML) into the nested mapping `raw`."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not key=value")
    key, text = override.split("=", 1)
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: not a valid YAML value ({str(error).splitlines()[0]})") from None
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node[int(part)] if isinstance(node, list) and part.isdigit() and int(part) < len(node) else (
            node.setdefault(part, {}) if isinstance(node, dict) else None)
        if nxt is None:
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: i + 1])} does not exist")
        node = nxt
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {override!r}: index {last} out of range")
        node[int(last)] = value
    else:
        node[last] = value


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> RecipeConfig:
    """Read a YAML recipe (safe_load only), apply `key=value` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    raw = raw or {}
    for override in overrides or []:
        apply_override(raw, override)
    return recipe_from_dict(raw, str(path))


def recipe_to_dict(recipe: RecipeConfig) -> dict:
    return dataclasses.asdict(recipe)


RECIPE_FILE = "recipe.yaml"  # the resolved recipe a run saves in its output_dir


def save_recipe(recipe: RecipeConfig, path: Path) -> None:
    """The resolved recipe (overrides applied, defaults filled) as YAML, written atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- running
def make_accelerator(recipe: RecipeConfig):
    """An Accelerator: bf16 autocast on GPU, fp32 on CPU; CPU runs with several processes form a
    gloo group (ACCELERATE_USE_CPU is set when no CUDA is present, except under DeepSpeed, which
    accelerate would then turn off)."""
    import torch

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"  # set by `accelerate launch`
    if deepspeed:
        _resolve_deepspeed_file()
        os.environ.pop("ACCELERATE_USE_CPU", None)  # inherited from a CPU run, it would switch DeepSpeed off
    cpu = not torch.cuda.is_available() and not deepspeed  # a CPU DeepSpeed run must not be told `cpu`
    if cpu:
        os.environ.setdefault("ACCELERATE_USE_CPU", "1")
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    precision = "no"
    if torch.cuda.is_available() and recipe.model.dtype in ("auto", "bfloat16"):
        precision = "bf16"
    # gloo on CPU: without it accelerate leaves a DeepSpeed launch's processes each alone
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if several and not torch.cuda.is_available() else []
    return Accelerator(mixed_precision=precision, cpu=cpu, kwargs_handlers=handlers)


def _resolve_deepspeed_file() -> None:
    """The launch configs name their DeepSpeed JSON relative to the repository root; a launch from
    another folder finds it there too (else one error naming the file)."""
    key = "ACCELERATE_DEEPSPEED_CONFIG_FILE"
    name = os.environ.get(key)
    if not name or name.lstrip().startswith("{") or Path(name).is_file():
        return
    in_repo = Path(__file__).resolve().parent.parent / name
    if not in_repo.is_file():
        raise ConfigError(f"DeepSpeed config {name} not found (relative to {Path.cwd()} or the repository root)")
    os.environ[key] = str(in_repo)


def model_dtype(recipe: RecipeConfig):
    import torch

    if recipe.model.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, recipe.model.dtype)


def data_task(stage: StageConfig) -> str:
    """The examples a stage trains on: "sft" (QA) for sft, ppo, grpo and projector, else "preference" (pairs)."""
    return "sft" if stage.type in ("sft", "ppo", "grpo", "projector") else "preference"


def _dataset_args(recipe: RecipeConfig, stage: StageConfig, processor) -> dict:
    """`build_datasets` keywords of a recipe's data section for one stage (the processor counts tokens)."""
    from alignment.data.catalog import DEFAULT_INSTRUCTION

    data = recipe.data
    return dict(
        format=data.format, task=data_task(stage), eval_fraction=data.eval_fraction,
        num_covers=data.num_covers, seed=data.seed, max_train_samples=data.max_train_examples,
        image_size=data.image_size if data.image_height is None else (data.image_size, data.image_height),
        max_eval_samples=data.max_eval_examples, verbose_fraction=data.verbose_fraction,
        off_kind_fraction=data.off_kind_fraction,
        sft_verbose_fraction=data.sft_verbose_fraction, sft_verbose_rate=data.sft_verbose_rate,
        sft_verbose_style=data.sft_verbose_style,
        instruction=data.instruction or DEFAULT_INSTRUCTION,
        validation=data.on_error, tokenizer=processor, max_length=data.max_length,
    )


def build_test_data(recipe: RecipeConfig, stage: StageConfig, processor):
    """(the stage's `test` examples, their validation report): the split nothing is tuned on; no
    examples when the source has none."""
    from alignment.data import build_datasets

    _, test, report = build_datasets(recipe.data.source, test_split="test", **_dataset_args(recipe, stage, processor))
    return test, report


def build_data(recipe: RecipeConfig, stage: StageConfig, processor, policy=None):
    """(train, eval, validation report) for one stage: QA examples for sft, pairs for dpo/reward/ppo;
    with `data.select` and a `policy`, the training examples are pruned on its embeddings."""
    from alignment.data import build_datasets
    from alignment.data.catalog import DEFAULT_INSTRUCTION

    data = recipe.data
    train, evaluation, report = build_datasets(data.source, **_dataset_args(recipe, stage, processor))
    if data.select is None:
        return train, evaluation, report
    if policy is None:
        print(f"[{stage.name}] data.select: {data.select.k} of the {len(train)} training examples by "
              f"{data.select.by}, chosen when the run starts (on the policy's embeddings)")
        return train, evaluation, report
    from alignment.data.pruning import select_for_recipe  # seed 002's pruning, on the policy's embeddings

    train = select_for_recipe(train, data.select, policy, data.seed, instruction=data.instruction or DEFAULT_INSTRUCTION,
                              max_length=data.max_length)
    return train, evaluation, report


def _check_data(recipe: RecipeConfig, datasets: dict, accelerator, processor) -> None:
    """Before any step: one warning line each for absent val examples and huge images; a `ConfigError`
    when a stage's training examples do not fill one batch (`alignment.run_checks`)."""
    from tqdm.auto import tqdm

    from alignment.run_checks import check_batches_fit, large_images_warning, no_val_warning

    if accelerator.is_main_process:
        for line in (no_val_warning(recipe, datasets),
                     large_images_warning(datasets, getattr(processor, "image_processor", None))):
            if line:
                tqdm.write(line)
    check_batches_fit(recipe, datasets, accelerator.num_processes)


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def run_recipe(recipe: RecipeConfig, dry_run: bool = False, accelerator=None) -> dict:
    """Run every stage in order (each starting from the previous stage's adapter); returns the report.

    A run (not a dry run) holds `<output_dir>/run.lock` for its life (`alignment.runlock`): a second
    run into the folder of a live one stops with one error line on every rank. Ctrl-C or SIGTERM
    stops it with exit code 130 / 143 and one line saying how to continue (`stages/interrupt.py`;
    inside a training loop, after a checkpoint of the step under way)."""
    from alignment.stages.interrupt import interruptible

    world_size, main = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")) == 0
    with interruptible(recipe.output_dir, world_size, announce=main, dry_run=dry_run):
        return _run_locked(recipe, dry_run, accelerator)


def _run_locked(recipe: RecipeConfig, dry_run: bool, accelerator) -> dict:
    from contextlib import ExitStack

    from alignment.runlock import RunLockError, run_lock

    accelerator = accelerator or make_accelerator(recipe)
    with ExitStack() as stack:
        refused = [None]
        if not dry_run and accelerator.is_main_process:
            _check_writable(Path(recipe.output_dir))
            try:
                stack.enter_context(run_lock(recipe.output_dir))
            except RunLockError as error:
                refused = [str(error)]
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(refused)
        if refused[0]:
            raise RunLockError(refused[0])
        return _run_recipe(recipe, dry_run, accelerator)


def _run_recipe(recipe: RecipeConfig, dry_run: bool, accelerator) -> dict:
    import torch
    from tqdm.auto import tqdm

    from alignment.data.catalog import DEFAULT_INSTRUCTION
    from alignment.policy import MultimodalPolicy
    from alignment.stages import STAGES, RunContext
    from alignment.stages import checkpoint as ckpt
    from alignment.stages.base import config_fingerprint
    from alignment.summary import run_summary, stage_metrics_table

    out = Path(recipe.output_dir)
    if accelerator.is_main_process:
        _check_writable(out)
    if not dry_run and not recipe.resume:
        _check_no_earlier_run(out, recipe)
    if not dry_run and accelerator.is_main_process:
        save_recipe(recipe, out / RECIPE_FILE)  # eval, generate and merge read the run's settings from it
    torch.manual_seed(recipe.seed)

    def load_policy():
        policy = MultimodalPolicy.from_pretrained(
            recipe.model.name, quantization=recipe.model.quantization, dtype=model_dtype(recipe),
            gradient_checkpointing=recipe.model.gradient_checkpointing,
            trust_remote_code=recipe.model.trust_remote_code,
            min_pixels=recipe.model.min_pixels, max_pixels=recipe.model.max_pixels,
            chat_template=recipe.model.chat_template,
        )
        return policy.to(accelerator.device) if recipe.model.quantization == "none" else policy

    policy = load_policy()
    instruction = recipe.data.instruction or DEFAULT_INSTRUCTION
    datasets, by_task, tests = {}, {}, {}
    for stage in recipe.stages:
        task = data_task(stage)  # stages of one task share their data (and its pruning, done once)
        if task not in by_task:
            by_task[task] = build_data(recipe, stage, policy.processor, None if dry_run else policy)
            tests[task] = build_test_data(recipe, stage, policy.processor)[0]
        datasets[stage.name] = by_task[task]
        train, evaluation, report = datasets[stage.name]
        if accelerator.is_main_process:
            tqdm.write(f"[{stage.name}] data: {len(train)} train, {len(evaluation)} val, "
                       f"{len(tests[task])} test; {report.summary()}")
    _check_data(recipe, datasets, accelerator, policy.processor)
    if dry_run:  # one real micro-batch per stage through the real processor and model
        from alignment.stages.probe import describe_probe, probe_stage

        ctx = RunContext(accelerator=accelerator, output_dir=out, seed=recipe.seed,
                         collate_kwargs={"instruction": instruction, "max_length": recipe.data.max_length},
                         prompt_kwargs={"instruction": instruction})
        stages = []
        for s in recipe.stages:
            facts = probe_stage(STAGES[s.type], s, policy, ctx, datasets[s.name][0])
            if accelerator.is_main_process:
                tqdm.write(describe_probe(s.name, facts))
            stages.append({"name": s.name, "train": len(datasets[s.name][0]), "eval": len(datasets[s.name][1]),
                           "batch": facts})
        return {"recipe": recipe.name, "dry_run": True, "stages": stages}

    report_path = out / "report.json"
    report = {"recipe": recipe.name, "model": recipe.model.name, "stages": []}
    if recipe.resume and report_path.exists():
        report = json.loads(report_path.read_text())
    from alignment.stages.engine import distributed_facts, per_rank_bytes

    report["distributed"] = distributed_facts(accelerator)
    done = {entry["name"]: entry for entry in report["stages"]}
    previous_adapter = None
    for stage_config in recipe.stages:
        stage_dir = out / stage_config.name
        fingerprint = {**config_fingerprint(stage_config), "model": recipe.model.name,
                       "world_size": accelerator.num_processes, "data": dataclasses.asdict(recipe.data)}
        if stage_config.name in done and (stage_dir / "adapter_model.safetensors").exists():
            last = ckpt.latest_checkpoint(stage_dir / "checkpoints")
            longer = {}
            if last is not None:  # finished with other settings: refuse rather than build on it
                longer = ckpt.check_fingerprint(last, ckpt.read_state(last)["fingerprint"], fingerprint)
            if not longer:
                previous_adapter = stage_dir  # finished before the resume: its adapter feeds the next stage
                continue
            _check_extension_is_last(recipe, stage_config, longer, out, done)  # else: it trains on, resumed
        train, evaluation, _ = datasets[stage_config.name]
        ctx = RunContext(
            accelerator=accelerator, output_dir=out, seed=recipe.seed, resume=recipe.resume,
            recipe_name=recipe.name, data_config=recipe.data, fingerprint=fingerprint,
            collate_kwargs={"instruction": instruction, "max_length": recipe.data.max_length},
            prompt_kwargs={"instruction": instruction},
            stage_types={s.name: s.type for s in recipe.stages[: recipe.stages.index(stage_config)]},
            load_policy=load_policy, report_to=tuple(recipe.report_to),
        )
        stage = STAGES[stage_config.type](stage_config, policy, ctx, train, evaluation,
                                          test_examples=tests[data_task(stage_config)])
        entry = stage.run(previous_adapter)
        previous_adapter = stage_dir
        report["stages"] = [s for s in report["stages"] if s["name"] != entry["name"]] + [entry]
        report["distributed"]["per_rank_bytes"] = per_rank_bytes(report["stages"])
        if accelerator.is_main_process:
            _write_json_atomic(report_path, report)
            _write_artifacts(out, recipe, report)
            tqdm.write(stage_metrics_table(entry))
    if accelerator.is_main_process:
        tqdm.write(run_summary(out, report))
    return report


def _check_extension_is_last(recipe: RecipeConfig, stage: StageConfig, longer: dict, out: Path, done: dict) -> None:
    """A finished stage may be extended (`ckpt.EXTENDABLE`) only while no later stage has started:
    a later stage's adapter, checkpoints or reference were built on this stage's shorter run."""
    index = recipe.stages.index(stage)
    started = [s.name for s in recipe.stages[index + 1 :]
               if s.name in done or any((out / s.name / "checkpoints").glob("step-*"))]
    if started:
        key, (old, new) = next(iter(longer.items()))
        raise ConfigError(f"stages.{index}.{key}: {old} -> {new} would extend stage {stage.name!r}, but stage "
                          f"{started[0]!r} was already trained on its {old}-step result; extend only the last "
                          "started stage, or choose a new output_dir")


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"output_dir {out} is not writable ({error.strerror}); choose another output_dir=") from None


def _check_no_earlier_run(out: Path, recipe: RecipeConfig) -> None:
    """Without resume=true, refuse an output_dir holding an earlier run: its checkpoints would mix
    with the new run's (and a later resume could pick the old ones), and its report would be lost."""
    earlier = [out / "report.json"] + [p for s in recipe.stages for p in (out / s.name / "checkpoints").glob("step-*")]
    found = [p for p in earlier if p.exists()]
    if found:
        raise ConfigError(f"output_dir {out} already holds a run ({found[0]}); set resume=true to continue it, "
                          "or choose a new output_dir= (nothing there is overwritten)")


def _write_artifacts(out: Path, recipe: RecipeConfig, report: dict) -> None:
    """Training curves (PNG), a short model card and the run page (report.html) next to report.json."""
    from alignment.report import write_curves, write_model_card
    from alignment.run_page import write_run_page

    write_curves(out / "training_curves.png", report)
    write_model_card(out / "README.md", recipe, report)
    write_run_page(out)


def describe(recipe: RecipeConfig) -> str:
    lines = [f"recipe {recipe.name}: model {recipe.model.name} ({recipe.model.quantization}), "
             f"data {recipe.data.source}, output {recipe.output_dir}"]
    for s in recipe.stages:
        lines.append(f"  - {s.name} ({s.type}): {s.max_steps} steps x {s.batch_size} x {s.grad_accum}, lr {s.lr}")
    return "\n".join(lines)


__all__ = ["ConfigError", "DataConfig", "LoraConfig", "ModelConfig", "RecipeConfig", "apply_override",
           "describe", "load_recipe", "recipe_from_dict", "run_recipe"]
