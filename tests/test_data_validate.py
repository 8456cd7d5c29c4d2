"""Validation: each bad input raises a clear error (file, row, field) or is skipped and counted."""

import io
import json
import os

import pytest
from PIL import Image

from alignment.data import (
    DataValidationError,
    ValidationReport,
    build_datasets,
    render_completion,
    render_prompt,
    validate_examples,
)


def png(color=(10, 20, 30), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def example(i=0, image=None, **fields):
    base = {"id": f"s{i}", "image_id": f"c{i}", "image": png() if image is None else image,
            "question": "Who wrote this book?", "answer": "Maria Lopez", "kind": "author",
            "source": "data.jsonl", "row": i}
    return base | fields


def check(bad, reason, field, tmp_path, match, **kwargs):
    """Error policy names file, row and field; skip policy drops the row and counts the reason."""
    examples = [example(0), bad, example(2)]
    with pytest.raises(DataValidationError, match=match) as info:
        validate_examples(examples, base_dir=tmp_path, **kwargs)
    assert f"data.jsonl: row 2, field '{field}'" in str(info.value)  # row index 1: the second row
    kept, report = validate_examples(examples, base_dir=tmp_path, policy="skip", **kwargs)
    assert [k["id"] for k in kept] == ["s0", "s2"]
    assert report.skipped == {reason: 1} and report.total == 3 and report.kept == 2


def test_missing_image_file(tmp_path):
    check(example(1, image="imgs/none.png"), "missing_image", "image", tmp_path, r"does not exist.*Fix the path")


def test_path_escaping_the_folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "secret.png").write_bytes(png())
    check(example(1, image="../secret.png"), "image_outside_folder", "image", data, "outside the data folder")
    check(example(1, image=str(tmp_path / "secret.png")), "image_outside_folder", "image", data, "outside")
    os.symlink(tmp_path / "secret.png", data / "link.png")
    check(example(1, image="link.png"), "image_outside_folder", "image", data, "outside")
    (data / "sub").mkdir()
    (data / "ok.png").write_bytes(png())
    kept, _ = validate_examples([example(1, image="sub/../ok.png")], base_dir=data)
    assert kept[0]["image"].size == (8, 8)


def test_corrupt_image(tmp_path):
    check(example(1, image=b"\x89PNG\r\n\x1a\nnot really"), "corrupt_image", "image", tmp_path, "cannot be decoded")
    truncated = png()[:40]
    check(example(1, image={"bytes": truncated, "path": None}), "corrupt_image", "image", tmp_path, "Re-encode")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    check(example(1, image="bad.png"), "corrupt_image", "image", tmp_path, "bad.png")


@pytest.mark.parametrize("mode, color", [("L", 100), ("RGBA", (255, 0, 0, 0)), ("P", 3), ("CMYK", (0, 0, 0, 0))])
def test_non_rgb_is_converted_and_counted(mode, color):
    kept, report = validate_examples([example(0, image=Image.new(mode, (4, 4), color)), example(1)])
    assert all(k["image"].mode == "RGB" for k in kept) and len(kept) == 2
    assert report.converted_to_rgb == 1 and not report.skipped
    if mode == "RGBA":  # transparent pixels are laid on white
        assert kept[0]["image"].getpixel((0, 0)) == (255, 255, 255)


def test_empty_question_and_answer(tmp_path):
    check(example(1, question="  "), "empty_question", "question", tmp_path, "empty question")
    check(example(1, answer=""), "empty_answer", "answer", tmp_path, "empty answer")
    pair = example(1, chosen="Yes", rejected="", answer="Yes")
    check(pair, "empty_answer", "rejected", tmp_path, "empty rejected")


def test_chosen_equals_rejected(tmp_path):
    pair = example(1, chosen="Kenji Sato", rejected="Kenji Sato ", answer="Kenji Sato")
    check(pair, "chosen_equals_rejected", "rejected", tmp_path, "two different answers")


def whitespace_tokenizer(text, **kwargs):
    return {"input_ids": list(range(len(text.split())))}


def test_over_long_row_is_an_error_not_truncated(tmp_path):
    long_answer = " ".join(["word"] * 50)
    kwargs = dict(tokenizer=whitespace_tokenizer, max_length=40)
    check(example(1, answer=long_answer), "too_long", "answer", tmp_path, "over max_length=40", **kwargs)
    # here prompt + answer is 17 "tokens"; image_seq_length adds the image's expanded tokens (LLaVA)
    assert validate_examples([example(0, answer=long_answer)], policy="skip", **kwargs)[1].skipped == {"too_long": 1}
    assert len(validate_examples([example(0)], **kwargs)[0]) == 1
    assert validate_examples([example(0)], policy="skip", image_seq_length=30, **kwargs)[1].skipped == {"too_long": 1}
    pair = example(0, chosen="Yes", rejected=long_answer, answer="Yes")
    with pytest.raises(DataValidationError, match="field 'rejected'"):
        validate_examples([pair], **kwargs)


def test_length_check_with_the_real_tokenizer():
    from alignment.models import load_processor

    tokenizer = load_processor("tiny-mllama").tokenizer
    kept, report = validate_examples([example(0), example(1, answer="Maria Lopez " * 30)],
                                     tokenizer=tokenizer, max_length=48, policy="skip")
    assert [k["id"] for k in kept] == ["s0"] and report.skipped == {"too_long": 1}
    with pytest.raises(ValueError, match="needs a tokenizer"):
        validate_examples([example(0)], max_length=10)


def test_length_check_counts_llava_image_tokens():
    """A processor as tokenizer: its image tokens count (Mllama 1, tiny LLaVA 8x8 patches = 64)."""
    from alignment.models import load_processor

    mllama, llava = load_processor("tiny-mllama"), load_processor("tiny-llava")
    prompt_ids = mllama.tokenizer(render_prompt("Who wrote this book?") + render_completion("Maria Lopez"),
                                  add_special_tokens=False)["input_ids"]
    fits = len(prompt_ids)
    assert len(validate_examples([example(0)], tokenizer=mllama, max_length=fits)[0]) == 1
    assert len(validate_examples([example(0)], tokenizer=llava, max_length=fits + 63)[0]) == 1
    with pytest.raises(DataValidationError, match=f"{fits + 63} tokens, over max_length={fits + 62}"):
        validate_examples([example(0)], tokenizer=llava, max_length=fits + 62)


def test_policy_and_report():
    with pytest.raises(ValueError, match="policy must be one of"):
        validate_examples([example(0)], policy="ignore")
    a = ValidationReport(total=3, kept=2, converted_to_rgb=1)
    a.skipped["missing_image"] += 1
    b = ValidationReport(total=1, kept=1)
    merged = a.merge(b)
    assert (merged.total, merged.kept, merged.converted_to_rgb, dict(merged.skipped)) == (4, 3, 1, {"missing_image": 1})
    assert merged.summary() == "kept 3/4; skipped: missing_image=1; converted to RGB: 1"


def test_build_datasets_names_the_file_row_and_field(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    rows = [{"image": "a.png", "questions": ["Who wrote this book?"], "answers": ["Kenji Sato"]},
            {"image": "gone.png", "questions": ["Who wrote this book?"], "answers": ["Kenji Sato"]},
            {"image": "a.png", "questions": ["Who wrote this book?", "Extra?"], "answers": ["Kenji Sato"]},
            {"image": "a.png", "questions": ["What is the title of this book?"], "answers": [""]}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataValidationError, match=r"rows.jsonl: line 3, field 'ocrvqa': malformed ocrvqa row"):
        build_datasets(str(path), eval_fraction=0.0)
    train, evaluation, report = build_datasets(str(path), eval_fraction=0.0, validation="skip",
                                               sft_verbose_fraction=1.0)
    assert len(train) == 1 and not evaluation
    assert report.skipped == {"missing_image": 1, "malformed_row": 1, "empty_answer": 1}
    assert report.total == 4 and report.kept == 1
    del rows[2]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataValidationError) as info:
        build_datasets(str(path), eval_fraction=0.0)
    assert f"{path}: line 2, field 'image'" in str(info.value) and "gone.png" in str(info.value)


# ----------------------------------------------------------------------------- errors in the user's words
def _data_file(tmp_path, rows, name="rows.jsonl", blank_lines_before=()):
    """A JSON lines file of `rows` (blank lines before the rows whose index is listed) next to a.png."""
    (tmp_path / "a.png").write_bytes(png())
    text = "".join(("\n" if i in blank_lines_before else "") + json.dumps(r) + "\n" for i, r in enumerate(rows))
    (tmp_path / name).write_text(text)
    return tmp_path / name


def _first_error(path, **kwargs) -> str:
    with pytest.raises(DataValidationError) as info:
        build_datasets(str(path), eval_fraction=0.0, **kwargs)
    return str(info.value)


def test_errors_name_the_line_the_field_and_the_recipe_key(tmp_path):
    """A messages row with an empty second turn answer, after a blank line: the error names the file's
    line (from 1, blank lines counted), the row's own field `messages[3].content`, and the recipe key
    `data.on_error=skip` (not the internal `policy='skip'`, not a field `'answer'` the row lacks)."""
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who wrote this book?"}]},
            {"role": "assistant", "content": "Kenji Sato"}]
    rows = [{"messages": turn, "images": ["a.png"]},
            {"messages": turn + [{"role": "user", "content": "Is it a novel?"}, {"role": "assistant", "content": " "}],
             "images": ["a.png"]}]
    message = _first_error(_data_file(tmp_path, rows, blank_lines_before={1}))
    assert message.startswith(f"{tmp_path / 'rows.jsonl'}: line 3, field 'messages[3].content': empty answer"), message
    assert "data.on_error=skip" in message and "policy=" not in message


def test_errors_of_preference_messages_and_qa_rows(tmp_path):
    pair = {"prompt": [{"role": "user", "content": "Who wrote this book?"}], "images": "a.png",
            "chosen": [{"role": "assistant", "content": "Kenji Sato"}],
            "rejected": [{"role": "assistant", "content": "Kenji Sato"}]}
    message = _first_error(_data_file(tmp_path, [pair], "pairs.jsonl"), task="preference")
    assert "pairs.jsonl: line 1, field 'rejected[0].content': chosen == rejected" in message, message
    qa = [{"image": "a.png", "questions": ["Who wrote this book?", "Is it a novel?"], "answers": ["Kenji Sato", ""]}]
    message = _first_error(_data_file(tmp_path, qa, "qa.jsonl"), sft_verbose_fraction=0.0)
    assert "qa.jsonl: line 1, field 'answers[1]': empty answer" in message, message


def test_malformed_row_and_parquet_rows_count_from_one(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"image": "a.png", "questions": ["Who wrote this book?"], "answers": ["Kenji Sato"]},
            {"image": "a.png", "questions": ["Who wrote this book?", "Extra?"], "answers": ["Kenji Sato"]}]
    message = _first_error(_data_file(tmp_path, rows))
    assert "rows.jsonl: line 2, field 'ocrvqa': malformed ocrvqa row" in message and "data.on_error=skip" in message
    rows[1] = {"image": "a.png", "questions": ["Who wrote this book?"], "answers": [""]}
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    message = _first_error(tmp_path / "rows.parquet", sft_verbose_fraction=0.0)
    assert "rows.parquet: row 2, field 'answers[0]': empty answer" in message, message


def test_too_long_names_the_recipe_keys(tmp_path):
    rows = [{"image": "a.png", "questions": ["Who wrote this book?"], "answers": ["Kenji Sato " * 20]}]
    message = _first_error(_data_file(tmp_path, rows), tokenizer=whitespace_tokenizer, max_length=8,
                           sft_verbose_fraction=0.0)
    assert "line 1, field 'answers[0]': prompt + answer is" in message, message
    assert "Raise data.max_length" in message and "data.on_error=skip" in message
