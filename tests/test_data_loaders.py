"""Loaders: every format from every file kind, into the example schema."""

import io
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from alignment.data import (
    FORMATS,
    DataSourceError,
    build_datasets,
    detect_format,
    load_examples,
    read_table,
    validate_examples,
)

SFT_KEYS = {"id", "image_id", "image", "question", "answer", "kind"}
PREF_KEYS = SFT_KEYS | {"chosen", "rejected"}


def png(color, mode="RGB", size=(16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def folder(tmp_path):
    """tmp_path/imgs/{red,blue}.png and a grayscale one."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "red.png").write_bytes(png((255, 0, 0)))
    (tmp_path / "imgs" / "blue.png").write_bytes(png((0, 0, 255)))
    (tmp_path / "imgs" / "gray.png").write_bytes(png(90, mode="L"))
    return tmp_path


def _decoded(examples, base_dir):
    kept, report = validate_examples(examples, base_dir=base_dir)
    assert all(e["image"].mode == "RGB" for e in kept)
    return kept, report


def test_ocrvqa_parquet_with_image_feature(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "image_id": datasets.Value("string"),
                                  "questions": datasets.List(datasets.Value("string")),
                                  "answers": datasets.List(datasets.Value("string")),
                                  "set_name": datasets.Value("string")})
    datasets.Dataset.from_dict({
        "image": [Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")],
        "image_id": ["a", "b"],
        "questions": [["Who wrote this book?", "Is this a Travel book?"], ["What is the title of this book?"]],
        "answers": [["Maria Lopez", "No"], ["Winter Garden"]],
        "set_name": ["train", "val"],
    }, features=features).to_parquet(str(tmp_path / "ocr.parquet"))
    examples, table = load_examples(tmp_path / "ocr.parquet")
    assert [e["id"] for e in examples] == ["a/q0", "a/q1", "b/q0"]
    assert [e["kind"] for e in examples] == ["author", "yesno", "title"]
    assert [e["split"] for e in examples] == ["train", "train", "val"]
    assert [e["row"] for e in examples] == [0, 0, 1]
    kept, _ = _decoded(examples, table.base_dir)
    assert set(kept[0]) >= SFT_KEYS and kept[0]["image"].getpixel((0, 0)) == (255, 0, 0)
    assert kept[0]["image"] is kept[1]["image"]  # one decode per cover


def test_ocrvqa_parquet_with_relative_paths_and_raw_bytes(folder):
    table = pa.table({
        "image": [{"bytes": None, "path": "imgs/red.png"}, {"bytes": png((0, 255, 0)), "path": None}],
        "questions": [["What type of book is this?"], ["Who wrote this book?"]],
        "answers": [["Travel"], ["Kenji Sato"]],
    })
    pq.write_table(table, folder / "paths.parquet")
    pq.write_table(pa.table({"image": [png((1, 2, 3))], "questions": [["q"]], "answers": [["a"]]}),
                   folder / "binary.parquet")
    examples, source = load_examples(folder / "paths.parquet", "ocrvqa")
    kept, _ = _decoded(examples, source.base_dir)
    assert [k["image"].getpixel((0, 0)) for k in kept] == [(255, 0, 0), (0, 255, 0)]
    assert kept[0]["image_id"] == "imgs/red.png" and kept[0]["split"] is None
    examples, source = load_examples(folder / "binary.parquet")
    assert _decoded(examples, source.base_dir)[0][0]["image"].getpixel((0, 0)) == (1, 2, 3)


def test_messages_jsonl_one_example_per_turn(folder):
    row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who wrote this book?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Laura Chen"}]},
        {"role": "user", "content": "Is this a Romance book?"},
        {"role": "assistant", "content": "Yes"},
    ], "images": ["imgs/blue.png"]}
    write_jsonl(folder / "sft.jsonl", [row])
    examples, table = load_examples(folder / "sft.jsonl")
    assert [(e["question"], e["answer"], e["kind"]) for e in examples] == [
        ("Who wrote this book?", "Laura Chen", "author"), ("Is this a Romance book?", "Yes", "yesno")]
    assert len({e["id"] for e in examples}) == 2
    assert _decoded(examples, table.base_dir)[0][1]["image"].getpixel((0, 0)) == (0, 0, 255)


def test_ids_are_unique_when_rows_share_an_image_or_an_id(folder):
    turn = [{"role": "user", "content": "Who wrote this book?"}, {"role": "assistant", "content": "Kenji Sato"}]
    write_jsonl(folder / "a.jsonl", [{"messages": turn, "images": ["imgs/red.png"]}] * 3
                + [{"messages": turn, "images": ["imgs/red.png"], "id": "x"}] * 2)
    examples, _ = load_examples(folder / "a.jsonl")
    ids = [e["id"] for e in examples]
    assert len(set(ids)) == 5 and ids[3:] == ["x/t0", "x/t0~2"]


def test_preference_jsonl_strings_and_messages(folder):
    rows = [
        {"prompt": "<image>What is the title of this book?", "chosen": "Winter Garden",
         "rejected": "The title shown is Winter Garden.", "images": ["imgs/red.png"]},
        {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who wrote this book?"}]}],
         "chosen": [{"role": "assistant", "content": "Anna Weber"}],
         "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Peter Novak"}]}],
         "images": ["imgs/blue.png"]},
    ]
    write_jsonl(folder / "pref.jsonl", rows)
    examples, _ = load_examples(folder / "pref.jsonl")
    assert set(examples[0]) >= PREF_KEYS
    assert [(e["question"], e["chosen"], e["rejected"], e["answer"]) for e in examples] == [
        ("What is the title of this book?", "Winter Garden", "The title shown is Winter Garden.", "Winter Garden"),
        ("Who wrote this book?", "Anna Weber", "Peter Novak", "Anna Weber")]


def test_rows_with_several_images_keep_them_all_in_order(folder):
    """messages, preference and rlaifv rows with two images: the example shows both (``images``), decoded
    to RGB in order; a missing second image is named."""
    from alignment.data import DataValidationError

    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same author?"}]},
            {"role": "assistant", "content": "No"}]
    write_jsonl(folder / "sft.jsonl", [{"messages": turn, "images": ["imgs/red.png", "imgs/gray.png"]}])
    write_jsonl(folder / "pref.jsonl", [{"prompt": "Same author?", "chosen": "No", "rejected": "Yes",
                                         "images": ["imgs/blue.png", "imgs/red.png"]}])
    write_jsonl(folder / "rlaifv.jsonl", [{"image": ["imgs/gray.png", "imgs/blue.png"], "question": "Same author?",
                                           "chosen": "No", "rejected": "Yes"}])
    colours = {"sft": [(255, 0, 0), (90, 90, 90)], "pref": [(0, 0, 255), (255, 0, 0)],
               "rlaifv": [(90, 90, 90), (0, 0, 255)]}
    for name, expected in colours.items():
        examples, table = load_examples(folder / f"{name}.jsonl")
        assert "image" not in examples[0] and len(examples[0]["images"]) == 2
        kept, _ = validate_examples(examples, base_dir=table.base_dir)
        assert [i.getpixel((0, 0)) for i in kept[0]["images"]] == expected and all(i.mode == "RGB" for i in kept[0]["images"])
    write_jsonl(folder / "bad.jsonl", [{"messages": turn, "images": ["imgs/red.png", "imgs/none.png"]}])
    examples, table = load_examples(folder / "bad.jsonl")
    with pytest.raises(DataValidationError, match=r"bad.jsonl: line 1, field 'images\[1\]'"):
        validate_examples(examples, base_dir=table.base_dir)


def test_arrow_save_to_disk_and_single_arrow_file(tmp_path):
    dataset = datasets.Dataset.from_dict({
        "image": [Image.new("RGB", (8, 8), "red")], "question": ["Who wrote this book?"],
        "chosen": ["Emily Stone"], "rejected": ["John Carter"]})
    dataset.save_to_disk(str(tmp_path / "saved"))
    examples, _ = load_examples(tmp_path / "saved")
    assert examples[0]["chosen"] == "Emily Stone" and examples[0]["kind"] == "author"
    arrow_file = next((tmp_path / "saved").glob("*.arrow"))
    examples, table = load_examples(arrow_file)
    assert detect_format(table.columns) == "rlaifv"
    kept, _ = _decoded(examples, table.base_dir)
    assert kept[0]["image"].getpixel((0, 0)) == (255, 0, 0)


def test_folder_of_images_with_jsonl(folder):
    write_jsonl(folder / "metadata.jsonl", [
        {"file_name": "imgs/red.png", "question": "Who wrote this book?", "chosen": "David Brown", "rejected": "Kenji Sato"},
        {"file_name": "imgs/gray.png", "question": "Is this a History book?", "chosen": "No", "rejected": "Yes"},
    ])
    examples, table = load_examples(folder)
    kept, report = _decoded(examples, table.base_dir)
    assert len(kept) == 2 and report.converted_to_rgb == 1
    assert kept[1]["image"].getpixel((0, 0)) == (90, 90, 90)


def test_build_datasets_from_a_folder(folder):
    rows = [{"file_name": f"imgs/{c}.png", "question": "Who wrote this book?", "chosen": f"A{i}",
             "rejected": f"B{i}", "image_id": f"img{i}"} for i, c in enumerate(["red", "blue"] * 20)]
    write_jsonl(folder / "metadata.jsonl", rows)
    train, evaluation, report = build_datasets(str(folder), task="preference", eval_fraction=0.3)
    assert len(train) + len(evaluation) == 40 and evaluation and report.kept == 40
    assert not {e["image_id"] for e in train} & {e["image_id"] for e in evaluation}
    sft, _, _ = build_datasets(str(folder), task="sft", eval_fraction=0.3)
    assert set(sft[0]) >= SFT_KEYS and "chosen" not in sft[0] and sft[0]["answer"] == train[0]["chosen"]


def test_hub_name_offline_fails_clearly(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataSourceError, match=r"(?s)someone/missing-set.*hub.*local path"):
        read_table("someone/missing-set")


def test_missing_file_and_unknown_file_type(tmp_path):
    with pytest.raises(DataSourceError, match="no such file"):
        read_table(tmp_path / "nope.parquet")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataSourceError, match="unknown file type"):
        read_table(tmp_path / "data.csv")


def test_wrong_columns_list_the_expected_ones(tmp_path):
    write_jsonl(tmp_path / "bad.jsonl", [{"picture": "x.png", "query": "q", "reply": "a"}])
    with pytest.raises(DataSourceError) as info:
        load_examples(tmp_path / "bad.jsonl")
    message = str(info.value)
    assert "bad.jsonl" in message and "['picture', 'query', 'reply']" in message
    for name, columns in FORMATS.items():
        assert f"{name}: {', '.join(columns)}" in message
    with pytest.raises(DataSourceError, match=r"format 'rlaifv' expects .*missing \['chosen', 'image', 'question', 'rejected'\]"):
        load_examples(tmp_path / "bad.jsonl", "rlaifv")
    with pytest.raises(DataSourceError, match="unknown data format 'csv'"):
        load_examples(tmp_path / "bad.jsonl", "csv")


def test_bad_json_line_is_named(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(DataSourceError, match=r"broken.jsonl: line 2 is not valid JSON"):
        read_table(tmp_path / "broken.jsonl")


@pytest.mark.parametrize("columns, expected", [
    (["image", "image_id", "questions", "answers", "title"], "ocrvqa"),
    (["messages", "images"], "messages"),
    (["prompt", "chosen", "rejected", "images"], "preference"),
    (["prompt", "chosen", "rejected", "image"], "preference"),
    (["image", "question", "chosen", "rejected", "ds_name"], "rlaifv"),
])
def test_detect_format(columns, expected):
    assert detect_format(columns) == expected


def test_small_data_holds_one_image_out_for_val(tmp_path):
    """Five rows on five images with eval_fraction 0.01: no hash draw lands under 0.01, yet one image is held
    out (the lowest draw); eval_fraction 0 holds none; an eval_fraction close to 1 still leaves one image to
    train on; rows on one image cannot be split by image and all train (whatever that image draws)."""
    for i in range(5):
        (tmp_path / f"c{i}.png").write_bytes(png((40 * i, 0, 0)))
    rows = [{"image": f"c{i}.png", "questions": ["Who wrote this book?"], "answers": [f"Author {i}"]} for i in range(5)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    for fraction, sizes in ((0.01, (4, 1)), (0.0, (5, 0)), (0.99, (1, 4))):
        train, evaluation, _ = build_datasets(str(path), eval_fraction=fraction, sft_verbose_fraction=0.0)
        assert (len(train), len(evaluation)) == sizes, fraction
        assert not {e["image_id"] for e in train} & {e["image_id"] for e in evaluation}
    one = write_jsonl(tmp_path / "one.jsonl", [{**r, "image": "c0.png"} for r in rows])
    train, evaluation, _ = build_datasets(str(one), eval_fraction=0.9, sft_verbose_fraction=0.0)  # c0 draws 0.74
    assert (len(train), len(evaluation)) == (5, 0)
