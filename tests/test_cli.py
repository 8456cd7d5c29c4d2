"""`vlm-align`: every subcommand's help; `train` leaves recipe, report, curves and model card;
`eval` reproduces the report's numbers; `generate` prints the policy's answer; errors are one line."""

import json

import pytest
import yaml

from alignment.cli import main
from alignment.recipe import load_recipe
from tests._cli_run import held_out, tiny_run

COMMANDS = ("train", "eval", "generate", "merge", "compress", "report")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory)


def _scalars(metrics):
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: vlm-align {command}") and "--debug" in out


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(command in out for command in COMMANDS)
    assert main([]) == 2


def test_train_leaves_recipe_report_curves_and_model_card(run):
    recipe = load_recipe(run / "recipe.yaml")
    assert [s.name for s in recipe.stages] == ["sft", "dpo"] and recipe.output_dir == str(run)
    assert recipe.report_to == ["tensorboard"] and list((run / "runs" / "dpo").glob("events.out.tfevents.*"))
    report = json.loads((run / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["sft", "dpo"]
    for stage in report["stages"]:  # the test split beside val, with the same metrics
        overall = {k for k in stage["eval"] if "/" not in k}  # per-kind keys depend on the kinds drawn
        assert {k for k in stage["test"] if "/" not in k} == overall, stage["name"]
        assert stage["test"]["samples"] != stage["eval"]["samples"]
    assert (run / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (run / "README.md").read_text()
    for text in ("## Results", "### sft (sft)", "### dpo (dpo)", "| preference_accuracy |", "| metric | val | test |",
                 "## Data",
                 f"vlm-align train {run}/recipe.yaml", f"vlm-align eval {run}/dpo", f"vlm-align generate {run}/dpo",
                 f"vlm-align merge {run}/dpo", "![training curves](training_curves.png)"):
        assert text in card, text
    recipe_block = card.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(recipe_block) == yaml.safe_load((run / "recipe.yaml").read_text())


def test_eval_on_the_test_split_reproduces_the_reports_test_block(run, tmp_path):
    out = tmp_path / "test.json"
    assert main(["eval", str(run / "dpo"), "--split", "test", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    entry = next(s for s in json.loads((run / "report.json").read_text())["stages"] if s["name"] == "dpo")
    assert result["data"]["split"] == "test"
    assert result["metrics"] == pytest.approx(_scalars(entry["test"]), abs=1e-6)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_eval_reproduces_the_report(run, stage, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert main(["eval", str(run / stage), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    entry = next(s for s in json.loads((run / "report.json").read_text())["stages"] if s["name"] == stage)
    assert result["data"]["split"] == "eval" and result["data"]["examples"] == 4
    assert result["metrics"] == pytest.approx(_scalars(entry["eval"]), abs=1e-6)
    assert [s["prediction"] for s in result["samples"]] == [s["prediction"] for s in entry["eval"]["samples"]]
    expected = {"sft": ("exact_match", "mean_answer_words", "exact_match_blind"),
                "dpo": ("preference_accuracy", "exact_match", "mean_answer_words")}[stage]
    assert set(expected) <= set(result["metrics"])
    table = capsys.readouterr().out
    assert "report.json" in table and all(key in table for key in expected)


def test_eval_on_another_data_source_takes_every_row(run, tmp_path):
    rows = []
    for i, example in enumerate(held_out(run, "sft")[:3]):
        example["image"].save(tmp_path / f"cover{i}.png")
        rows.append({"images": [f"cover{i}.png"], "messages": [
            {"role": "user", "content": example["question"]}, {"role": "assistant", "content": example["answer"]}]})
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "m.json"
    assert main(["eval", str(run / "sft"), f"data.path={data}", "data.format=messages", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["data"]["split"] == "all" and result["data"]["examples"] == 3
    assert result["data"]["source"] == str(data) and len(result["samples"]) == 3
    assert 0.0 <= result["metrics"]["exact_match"] <= 1.0


def test_generate_prints_the_answer_the_stage_gave_in_evaluation(run, tmp_path, capsys):
    """Greedy and alone, the answer to the first held-out cover is the one in the report's samples."""
    example = held_out(run, "dpo")[0]
    image = tmp_path / "cover.png"
    example["image"].save(image)
    capsys.readouterr()
    assert main(["generate", str(run / "dpo"), "--image", str(image), "--question", example["question"]]) == 0
    answer = capsys.readouterr().out.rstrip("\n")
    entry = next(s for s in json.loads((run / "report.json").read_text())["stages"] if s["name"] == "dpo")
    assert answer == entry["eval"]["samples"][0]["prediction"]


def test_generate_samples_several_answers_with_a_seed(run, tmp_path, capsys):
    """--num-samples answers at --temperature: one a line, the same for the same --seed; bad values refused."""
    example = held_out(run, "dpo")[0]
    image = tmp_path / "cover.png"
    example["image"].save(image)
    argv = ["generate", str(run / "dpo"), "--image", str(image), "--question", example["question"],
            "--temperature", "5", "--top-p", "0.95", "--num-samples", "4", "--max-new-tokens", "6"]
    capsys.readouterr()
    assert main([*argv, "--seed", "1"]) == 0
    first = capsys.readouterr().out.splitlines()
    assert main([*argv, "--seed", "1"]) == 0
    assert capsys.readouterr().out.splitlines() == first and len(first) == 4
    assert main([*argv, "--seed", "2"]) == 0
    assert capsys.readouterr().out.splitlines() != first  # temperature 5 on a tiny model: the seed decides
    for flags, message in ((["--num-samples", "3"], "with --temperature 0"), (["--top-p", "0"], "--top-p must be"),
                           (["--temperature", "-1"], "--temperature must be")):
        assert main(["generate", str(run / "dpo"), "--image", str(image), "--question", "q", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, (flags, err)


def test_version_and_grpo_in_the_top_level_help(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"vlm-align {version('vlm-align')}"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "GRPO" in capsys.readouterr().out


def test_eval_of_a_run_folder_lists_its_stages(run, capsys):
    capsys.readouterr()
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {run} is a run folder; give one of its stages as RUN_DIR/STAGE: {run / 'sft'}, "
                   f"{run / 'dpo'}")


def test_errors_are_one_line_with_exit_2(run, tmp_path, capsys):
    cases = [
        (["eval", str(tmp_path / "nowhere" / "sft")], "has no recipe.yaml"),
        (["generate", str(run / "ppo"), "--image", "x.png", "--question", "q"], "not a stage of the run"),
        (["generate", str(run / "dpo"), "--image", str(tmp_path / "missing.png"), "--question", "q"], "does not exist"),
        (["merge", str(run / "dpo"), str(run)], "not empty"),
        (["eval", str(run / "dpo"), "stages.9.beta=1"], "does not exist"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, (argv, err)


def test_report_to_is_checked_and_honoured(tmp_path):
    import importlib.util

    from alignment.config import ConfigError
    from alignment.recipe import recipe_from_dict
    from alignment.stages.trackers import open_trackers as _writer

    assert recipe_from_dict({"stages": [{"type": "sft"}]}).report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match="report_to"):
        recipe_from_dict({"report_to": ["mlflow"], "stages": [{"type": "sft"}]})
    with pytest.raises(ConfigError, match="none cannot be combined"):
        recipe_from_dict({"report_to": ["none", "tensorboard"], "stages": [{"type": "sft"}]})
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match="wandb is not installed"):
            recipe_from_dict({"report_to": ["wandb"], "stages": [{"type": "sft"}]})
    assert _writer(tmp_path / "off", ("none",)) is None and not (tmp_path / "off").exists()
    writer = _writer(tmp_path / "tb", ("tensorboard",))
    writer.add_scalar("sft/loss", 1.0, 1)
    writer.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


TINY_RECIPES = sorted(p for p in __import__("pathlib").Path(__file__).parents[1].joinpath("recipes").glob("*.yaml")
                      if "tiny-" in p.read_text())


@pytest.mark.parametrize("path", TINY_RECIPES, ids=lambda p: p.stem)
def test_every_tiny_recipe_passes_dry_run_with_options_anywhere(path, tmp_path, capsys):
    """`--dry-run` validates recipe, model and data; it may come before or after the overrides."""
    out = tmp_path / "run"
    assert main(["train", str(path), "--dry-run", f"output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "dry run ok" in printed and not out.joinpath("report.json").exists()  # validated, trained nothing


def test_an_unreachable_hub_model_is_one_error_line(tmp_path, capsys):
    """HF_HUB_OFFLINE=1 (conftest) and no cached copy: one `error:` line naming the model and the remedies."""
    code = main(["train", "recipes/dpo_llama32_vision_11b.yaml", f"output_dir={tmp_path}", "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: model 'meta-llama/Llama-3.2-11B-Vision-Instruct'")
    assert "HF_HUB_OFFLINE" in err[0] and "model.name=<local folder>" in err[0]


def test_a_model_that_is_not_a_vlm_is_one_error_line(tmp_path, capsys):
    """A folder holding a text-only Llama: one `error:` line naming its model type and the supported ones."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "text-llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(folder)
    capsys.readouterr()
    code = main(["train", "recipes/dpo_bookcover.yaml", f"output_dir={tmp_path / 'out'}", f"model.name={folder}",
                 "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: model type 'llama' (LlamaConfig) is not a vision-language model")
    assert all(t in err[0] for t in ("mllama", "llava", "qwen2_5_vl", "qwen3_vl"))


@pytest.mark.parametrize("kind, expected", [
    ("GatedRepoError", "is gated on the Hugging Face Hub: accept its licence"),
    ("RepositoryNotFoundError", "is neither a local folder nor a Hub repository"),
    ("LocalEntryNotFoundError", "is not in the local Hub cache"),
])
def test_hub_failures_name_their_remedy(kind, expected):
    from alignment.models.registry import hub_error

    cause = type(kind, (Exception,), {})("the hub said no")
    error = OSError("loading failed")
    error.__cause__ = cause
    message = str(hub_error("org/model", error))
    assert expected in message and "'org/model'" in message and "\n" not in message


def test_dry_run_counts_llava_image_tokens_and_runs_a_real_batch(tmp_path, capsys):
    """A LLaVA whose placeholder is `<image>` (576 tokens at 336 px): the length check counts the image
    as the model sees it, so max_length 256 fails at the dry run, naming the row; 1024 passes, and the
    dry run collates and forwards one real batch per stage."""
    base = ["train", "recipes/dpo_bookcover.yaml", "model.name=standin-llava", "data.num_covers=20",
            "stages.0.batch_size=2", "stages.1.batch_size=2", "--dry-run"]
    assert main([*base, f"output_dir={tmp_path / 'a'}"]) == 2
    err = capsys.readouterr().err
    assert "over max_length=256" in err and "sample" in err
    assert main([*base, f"output_dir={tmp_path / 'b'}", "data.max_length=1024"]) == 0
    out = capsys.readouterr()
    assert "[dpo] real batch ok: 4 rows" in out.err + out.out and "576 vision tokens each" in out.err + out.out


def _with_chat_template(tmp_path, name: str, template: str):
    """A copy of tiny model `name`'s folder whose checkpoint ships `template` (chat_template.jinja)."""
    import shutil

    from alignment.models.registry import resolve_model_path

    folder = tmp_path / f"{name}-text-template"
    shutil.copytree(resolve_model_path(name), folder)
    (folder / "chat_template.jinja").write_text(template)
    return folder


def test_a_llava_with_a_text_only_template_dry_runs(tmp_path, capsys):
    """A LLaVA shipping its Llama 3 LM's template (string content only): `--dry-run` renders the prompt as
    string content with LLaVA's `<image>\\n` and runs a real batch, with no traceback."""
    from alignment.models.standins import LLAMA3_TEXT_TEMPLATE

    folder = _with_chat_template(tmp_path, "tiny-llava", LLAMA3_TEXT_TEMPLATE)
    code = main(["train", "recipes/dpo_bookcover.yaml", f"output_dir={tmp_path / 'run'}", f"model.name={folder}",
                 "model.quantization=none", "data.num_covers=20", "stages.0.batch_size=2", "stages.1.batch_size=2",
                 "--dry-run"])
    out = capsys.readouterr()
    assert code == 0 and "dry run ok" in out.out, out.err


def test_a_template_without_image_parts_is_one_error_line_and_the_key_passes_one(tmp_path, capsys):
    """An Idefics3 shipping a text-only template (no image placeholder convention for string content): one
    `error:` line naming the template and `model.chat_template`, exit 2; with `model.chat_template=FILE`
    the file's template is used and the dry run passes."""
    from alignment.models import generic
    from alignment.models.standins import LLAMA3_TEXT_TEMPLATE

    folder = _with_chat_template(tmp_path, "tiny-idefics3", LLAMA3_TEXT_TEMPLATE)
    base = ["train", "recipes/dpo_bookcover.yaml", f"model.name={folder}", "model.quantization=none",
            "data.num_covers=20", "stages.0.batch_size=2", "stages.1.batch_size=2", "--dry-run"]
    capsys.readouterr()
    assert main([*base, f"output_dir={tmp_path / 'a'}"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("error: model.chat_template: the processor's chat template of ")
    assert str(folder) in errors[0] and "model.chat_template=path/to/template.jinja" in errors[0]
    template = tmp_path / "idefics3.jinja"
    template.write_text(generic.IDEFICS3_TEMPLATE)
    assert main([*base, f"output_dir={tmp_path / 'b'}", f"model.chat_template={template}"]) == 0
    assert "dry run ok" in capsys.readouterr().out
    from alignment.runs import load_base  # eval, generate and compress load the run's base with the key too

    recipe = load_recipe("recipes/dpo_bookcover.yaml", [f"model.name={folder}", "model.quantization=none",
                                                         f"model.chat_template={template}"])
    assert load_base(recipe, "cpu").processor.chat_template == generic.IDEFICS3_TEMPLATE


# ---- BitDelta (issue #21): `compress`, and several adapters served from one base (`--adapters`)
@pytest.fixture(scope="module")
def compressed(run, tmp_path_factory):
    """The run's sft and dpo stages compressed to 1-bit deltas (3 distillation steps on 8 examples);
    returns (folder of both, what each compress printed)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("compressed")
    printed = {}
    for stage in ("sft", "dpo"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["compress", str(run / stage), "--out", str(root / f"{stage}-1bit"), "--steps", "3",
                         "--samples", "8", "--batch-size", "4"]) == 0
        printed[stage] = out.getvalue()
    return root, printed


def test_compress_writes_a_one_bit_delta_under_a_tenth_of_the_bf16_delta(compressed):
    import re

    root, printed = compressed
    for stage in ("sft", "dpo"):
        sizes = re.search(r"bf16 ([\d,]+) bytes -> 1-bit ([\d,]+) bytes", printed[stage])
        dense, onebit = (int(g.replace(",", "")) for g in sizes.groups())
        assert onebit <= dense / 10, printed[stage]
        assert "logit MSE to the fine-tune" in printed[stage] and f"--adapters {root / f'{stage}-1bit'}" in printed[stage]
        config = json.loads((root / f"{stage}-1bit" / "adapter_config.json").read_text())
        assert config["peft_type"] == "BITDELTA" and config["source_method"] == "lora"
        assert config["distillation"]["steps"] == 3 and config["distillation"]["samples"] == 8
        assert (root / f"{stage}-1bit" / "adapter_model.safetensors").stat().st_size <= dense / 10


def test_eval_serves_several_adapters_from_one_base(run, compressed, tmp_path, capsys):
    """Both 1-bit deltas on one base, evaluated in turn; a delta's numbers are the same alone or beside another."""
    root, _ = compressed
    both = f"{root / 'sft-1bit'},{root / 'dpo-1bit'}"
    assert main(["eval", str(run / "sft"), "--adapters", both, "--out", str(tmp_path / "both.json")]) == 0
    table = capsys.readouterr().out
    assert "2 adapters on one base" in table and "sft_1bit" in table and "dpo_1bit" in table
    result = json.loads((tmp_path / "both.json").read_text())
    assert list(result["adapters"]) == ["sft_1bit", "dpo_1bit"] and result["data"]["examples"] == 4
    for entry in result["adapters"].values():
        assert {"exact_match", "mean_answer_words", "exact_match_blind"} <= set(entry["metrics"])
    assert main(["eval", str(run / "sft"), "--adapters", str(root / "sft-1bit"), "--out", str(tmp_path / "one.json")]) == 0
    alone = json.loads((tmp_path / "one.json").read_text())["adapters"]["sft_1bit"]
    assert alone == result["adapters"]["sft_1bit"]


def test_generate_answers_with_each_adapter_in_turn(run, compressed, tmp_path, capsys):
    """One line per adapter; each is the answer that adapter gave the same cover in `eval --adapters`."""
    root, _ = compressed
    example = held_out(run, "sft")[0]
    example["image"].save(tmp_path / "cover.png")
    both = f"{root / 'sft-1bit'},{root / 'dpo-1bit'}"
    assert main(["eval", str(run / "sft"), "--adapters", both, "--out", str(tmp_path / "m.json")]) == 0
    samples = {name: entry["samples"][0]["prediction"]
               for name, entry in json.loads((tmp_path / "m.json").read_text())["adapters"].items()}
    capsys.readouterr()
    assert main(["generate", str(run / "sft"), "--adapters", both, "--image", str(tmp_path / "cover.png"),
                 "--question", example["question"]]) == 0
    lines = [line.rstrip() for line in capsys.readouterr().out.rstrip("\n").split("\n")]
    assert lines == [f"{name}: {answer}".rstrip() for name, answer in samples.items()]


def test_compress_and_adapters_errors_are_one_line(run, compressed, tmp_path, capsys):
    root, _ = compressed
    with pytest.raises(SystemExit) as exit_:
        main(["compress", "--help"])
    assert exit_.value.code == 0 and "--steps" in capsys.readouterr().out
    cases = [
        (["compress", str(run / "sft"), "--out", str(root / "sft-1bit")], "not empty"),
        (["compress", str(run / "sft"), "--out", str(run / "sft"), "--overwrite"], "stage's own folder"),
        (["compress", str(run / "sft"), "--steps", "-1"], "--steps must be >= 0"),
        (["eval", str(run / "sft"), "--adapters", f"{run / 'sft'},{root / 'sft-1bit'}"], "one kind"),
        (["eval", str(run / "sft"), "--adapters", str(tmp_path / "nothing")], "no adapter_model.safetensors"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, (argv, err)


def test_report_rebuilds_the_run_page(run, capsys):
    page = run / "report.html"
    before = page.read_text()
    page.unlink()
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {page}" and page.read_text() == before
    assert main(["report", str(run / "sft")]) == 2
    assert "has no report.json" in capsys.readouterr().err


def test_adapters_are_written_with_the_mode_of_every_other_file(run):
    """safetensors creates 0600 files; a run's adapters follow the umask like report.json beside them."""
    mode = (run / "report.json").stat().st_mode & 0o777
    weights = sorted(run.glob("*/adapter_model.safetensors")) + sorted(run.glob("*/checkpoints/*/**/*.safetensors"))
    assert weights and {w.stat().st_mode & 0o777 for w in weights} == {mode}, [(str(w), oct(w.stat().st_mode)) for w in weights]
