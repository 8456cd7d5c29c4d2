"""The shared loop: schedule, stream, resume after a crash, and 2 processes x b == 1 process x 2b."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignment.recipe import run_recipe
from alignment.stages.base import Stage
from alignment.stages.schedule import lr_at
from alignment.stages.stream import ExampleStream
from tests._recipes import build, tiny_recipe

ROOT = Path(__file__).resolve().parent.parent


def test_lr_schedule_by_hand():
    # warmup 2 of 10: steps 0,1 -> 0.5, 1.0 of peak; cosine to 0.1 x peak at the end
    assert lr_at(0, 10, 1.0, 2) == 0.5 and lr_at(1, 10, 1.0, 2) == 1.0
    assert lr_at(2, 10, 1.0, 2) == pytest.approx(1.0)
    assert lr_at(10, 10, 1.0, 2) == pytest.approx(0.1)
    assert lr_at(6, 10, 1.0, 2, "linear") == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(7, 10, 3.0, 0, "constant") == 3.0


def test_stream_two_ranks_cover_what_one_rank_with_twice_the_batch_covers():
    examples = list(range(40))
    one = ExampleStream(examples, 8, seed=3)
    ranks = [ExampleStream(examples, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(7):  # crosses an epoch boundary
        assert one.next_batch() == ranks[0].next_batch() + ranks[1].next_batch()


def test_stream_draw_numbers_are_unique_and_the_same_on_any_number_of_processes():
    examples = list(range(40))
    one = ExampleStream(examples, 8, seed=3)
    ranks = [ExampleStream(examples, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    seen = []
    for _ in range(12):  # 2.4 epochs: examples come back, draw numbers do not
        batch, draws = one.next_numbered_batch()
        split = [ranks[r].next_numbered_batch() for r in range(2)]
        assert draws == split[0][1] + split[1][1] and batch == split[0][0] + split[1][0]
        seen += draws
    assert len(set(seen)) == len(seen) == 96 and len(set(x for x in seen)) > len(examples)
    joined, single = ExampleStream(examples, 8, seed=3), ExampleStream(examples, 8, seed=3)
    parts = [single.next_numbered_batch() for _ in range(3)]
    assert joined.next_numbered_batches(3) == ([e for b, _ in parts for e in b], [d for _, n in parts for d in n])


def test_stream_resume_sees_each_example_as_often():
    examples = list(range(30))
    full = ExampleStream(examples, 4, seed=1)
    ledger_full = [x for _ in range(12) for x in full.next_batch()]
    first = ExampleStream(examples, 4, seed=1)
    ledger = [x for _ in range(5) for x in first.next_batch()]
    resumed = ExampleStream(examples, 4, seed=1)
    resumed.load_state_dict(first.state_dict())
    ledger += [x for _ in range(7) for x in resumed.next_batch()]
    assert ledger == ledger_full
    with pytest.raises(ValueError, match="batch_size"):
        ExampleStream(examples, 5, seed=1).load_state_dict(first.state_dict())


def adapter(out, stage):
    return load_file(str(Path(out) / stage / "adapter_model.safetensors"))


def test_crash_mid_stage_then_resume_gives_the_same_adapter(tmp_path, monkeypatch):
    """SFT then DPO; DPO crashes after its step-2 checkpoint; resume=true finishes identically."""
    straight = tmp_path / "straight"
    run_recipe(build(tiny_recipe(straight, steps=4)))

    crashed = tmp_path / "crashed"
    original = Stage._optimizer_step

    def crash_at_dpo_step_3(self, optimizer, params, stream, step):
        if self.type == "dpo" and step == 2:
            raise KeyboardInterrupt("simulated crash")
        return original(self, optimizer, params, stream, step)

    monkeypatch.setattr(Stage, "_optimizer_step", crash_at_dpo_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(build(tiny_recipe(crashed, steps=4)))
    monkeypatch.setattr(Stage, "_optimizer_step", original)
    assert (crashed / "dpo" / "checkpoints" / "step-000002" / "manifest.json").exists()
    assert not (crashed / "dpo" / "adapter_model.safetensors").exists()
    report = run_recipe(build(tiny_recipe(crashed, steps=4, resume=True)))

    for stage in ("sft", "dpo"):
        a, b = adapter(straight, stage), adapter(crashed, stage)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    straight_report = json.loads((straight / "report.json").read_text())
    assert [h["loss"] for h in report["stages"][1]["history"]] == [
        h["loss"] for h in straight_report["stages"][1]["history"]]
    assert (crashed / "training_curves.png").exists() and (crashed / "README.md").exists()


def test_incomplete_checkpoint_is_ignored(tmp_path):
    from alignment.stages import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    for step in (2, 4):
        folder = ckpt.staging_dir(root, step)
        folder.mkdir(parents=True)
        (folder / "state.json").write_text("{}")
        ckpt.write_manifest(folder)
        ckpt.publish(root, step, keep=5)
    (root / "step-000004" / "state.json").write_text("{truncated")  # size no longer matches
    (root / "step-000006").mkdir()  # no manifest: a write that never finished
    assert ckpt.latest_checkpoint(root) == root / "step-000002"


def test_a_stages_evaluation_is_logged_beside_its_training_scalars(tmp_path):
    """`Stage.run` writes the val and test metrics to the stage's TensorBoard folder at its last step
    (`<stage>/eval/<metric>`, `<stage>/test/<metric>`); an absent (None) metric writes nothing."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests._toy_stage import ToyStage, toy_stage

    class Evaluated(ToyStage):
        def evaluate(self):  # val has 2 examples, test 1: different numbers per split
            return {"exact_match": len(self.eval_examples) / 4, "loss": None, "samples": []}

    toy = toy_stage(tmp_path, max_steps=3, log_every=1)
    stage = Evaluated(toy.config, toy.policy, toy.ctx, toy.train_examples, [{"id": "v1"}, {"id": "v2"}],
                      test_examples=[{"id": "t1"}])
    entry = stage.run()
    assert entry["eval"]["exact_match"] == 0.5 and entry["test"]["exact_match"] == 0.25
    events = EventAccumulator(str(tmp_path / "runs" / "toy"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"toy/loss", "toy/eval/exact_match", "toy/test/exact_match"} <= set(tags)
    assert not [t for t in tags if t.endswith("/loss") and t != "toy/loss"]  # None is not logged as a number
    assert [(e.step, e.value) for e in events.Scalars("toy/eval/exact_match")] == [(3, 0.5)]
    assert [(e.step, e.value) for e in events.Scalars("toy/test/exact_match")] == [(3, 0.25)]
    assert len(list((tmp_path / "runs" / "toy").glob("events.out.tfevents.*"))) == 1  # one writer for the stage
