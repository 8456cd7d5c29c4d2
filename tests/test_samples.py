"""alignment.samples: a stage's shown held-out answers saved with their images for the run page."""

import json

from PIL import Image

from alignment.samples import MAX_SIDE, read_samples, write_samples, write_stage_samples


def _examples():
    red, blue = Image.new("RGB", (600, 300), (220, 30, 30)), Image.new("RGB", (40, 40), (20, 40, 200))
    return [{"id": "a/q0", "image_id": "a", "image": red, "question": "Who wrote this book?"},
            {"id": "a/q1", "image_id": "a", "image": red, "question": "What is the title?"},
            {"id": "b/q0", "image_id": "b", "image": blue, "question": "Is this Travel?"}]


def _samples(questions, prefix=""):
    return [{"question": q, "answer": f"ref {i}", "prediction": f"{prefix}{i}"} for i, q in enumerate(questions)]


def test_records_pair_each_answer_with_its_image_and_store_each_image_once(tmp_path):
    examples = _examples()
    path = write_samples(tmp_path / "sft", "sft", "sft", "test", examples, _samples([e["question"] for e in examples]))
    saved = json.loads(path.read_text())
    assert saved["split"] == "test" and saved["stage"] == "sft"
    assert [(r["id"], r["reference"], r["answer"]) for r in saved["examples"]] == \
        [("a/q0", "ref 0", "0"), ("a/q1", "ref 1", "1"), ("b/q0", "ref 2", "2")]
    first, second, third = (r["images"] for r in saved["examples"])
    assert first == second != third  # one cover asked about twice: one file
    assert len(list((tmp_path / "sft" / "samples").iterdir())) == 2
    with Image.open(tmp_path / "sft" / first[0]) as red:
        assert max(red.size) == MAX_SIDE and red.getpixel((5, 5)) == (220, 30, 30)  # capped, colours kept
    with Image.open(tmp_path / "sft" / third[0]) as blue:
        assert blue.size == (40, 40)  # never enlarged


def test_an_answer_to_another_question_is_left_out_and_no_answers_write_nothing(tmp_path):
    examples = _examples()
    samples = _samples(["Who wrote this book?", "something else", "Is this Travel?"])
    records = read_samples(write_samples(tmp_path / "dpo", "dpo", "dpo", "val", examples, samples).parent)["examples"]
    assert [r["question"] for r in records] == ["Who wrote this book?", "Is this Travel?"]
    assert write_samples(tmp_path / "reward", "reward", "reward", "val", examples, []) is None
    assert read_samples(tmp_path / "reward") is None


def test_the_test_split_is_shown_when_evaluated_else_val(tmp_path):
    examples = _examples()
    val = {"exact_match": 0.5, "samples": _samples([e["question"] for e in examples], "val ")}
    test = {"exact_match": 0.0, "samples": _samples([e["question"] for e in examples[:1]], "test ")}
    write_stage_samples(tmp_path / "a", "a", "sft", val, test, examples, examples)
    assert [(r["answer"]) for r in read_samples(tmp_path / "a")["examples"]] == ["test 0"]
    write_stage_samples(tmp_path / "b", "b", "sft", val, None, examples, [])
    saved = read_samples(tmp_path / "b")
    assert saved["split"] == "val" and [r["answer"] for r in saved["examples"]] == ["val 0", "val 1", "val 2"]


def test_several_images_per_example_keep_their_order(tmp_path):
    one, two = Image.new("RGB", (8, 8), (0, 0, 0)), Image.new("RGB", (8, 8), (255, 255, 255))
    example = {"id": "m", "image_id": "m", "images": [two, one], "question": "Which is brighter?"}
    path = write_samples(tmp_path, "s", "sft", "val", [example], _samples(["Which is brighter?"]))
    (record,) = json.loads(path.read_text())["examples"]
    colours = [Image.open(tmp_path / p).getpixel((0, 0)) for p in record["images"]]
    assert colours == [(255, 255, 255), (0, 0, 0)]
