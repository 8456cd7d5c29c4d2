"""synthetic_bookcover: schema, cues, determinism, cache, split by cover, the blind switch."""

import io
import time

import datasets
import pytest
from PIL import Image

from alignment.data import (
    blank_cover,
    build_datasets,
    catalog,
    image_blind,
    synthetic_bookcover,
    synthetic_bookcover_path,
)
from alignment.data.synthetic import generate_rows

COLUMNS = {"image", "image_id", "questions", "answers", "ocr_tokens", "title", "authorName", "genre",
           "image_width", "image_height", "set_name"}


@pytest.fixture(scope="module")
def covers(tmp_path_factory):
    return synthetic_bookcover(num_covers=40, seed=3, cache_dir=tmp_path_factory.mktemp("covers"))


def _close(a, b, tolerance=12):
    return all(abs(x - y) <= tolerance for x, y in zip(a, b))


def test_schema_is_ocrvqa(covers):
    assert set(covers.column_names) == COLUMNS and len(covers) == 40
    row = covers[0]
    assert isinstance(row["image"], Image.Image) and row["image"].mode == "RGB"
    assert row["image"].size == (row["image_width"], row["image_height"]) == (112, 112)
    assert len(row["questions"]) == len(row["answers"])
    assert row["ocr_tokens"] == row["authorName"].split() + row["title"].split()


def test_questions_follow_the_catalog(covers):
    yes_no = {t.format(genre=g) for t in catalog.YES_NO_QUESTIONS for g in catalog.GENRES}
    truthful = 0
    for row in covers:
        q, a = row["questions"], row["answers"]
        assert q[0] in catalog.AUTHOR_QUESTIONS and a[0] == row["authorName"] in catalog.AUTHORS
        assert q[1] in catalog.TITLE_QUESTIONS and a[1] == row["title"] in catalog.TITLES
        assert q[2] in catalog.GENRE_QUESTIONS and a[2] == row["genre"] in catalog.GENRES
        assert 1 <= len(q) - 3 <= 2 and len(set(q)) == len(q)
        for question, answer in zip(q[3:], a[3:]):
            assert question in yes_no and answer == ("Yes" if row["genre"] in question else "No")
            truthful += answer == "Yes"
    assert 0.25 < truthful / sum(len(r["questions"]) - 3 for r in covers) < 0.75


def test_visual_cues_are_drawn(covers):
    """Background = genre colour, top-left mark = author colour, band = title colour (± noise)."""
    for row in covers:
        image = row["image"]
        assert _close(image.getpixel((110, 60)), catalog.GENRES[row["genre"]][0])
        assert _close(image.getpixel((15, 15)), catalog.AUTHORS[row["authorName"]])
        band = catalog.TITLES[row["title"]][0]
        band_rows = [image.getpixel((x, y)) for y in range(72, 96) for x in range(0, 112)]
        assert sum(_close(p, band) for p in band_rows) > len(band_rows) // 3


def test_covers_differ_but_are_deterministic(tmp_path):
    a = generate_rows(6, seed=7)
    b = generate_rows(6, seed=7)
    c = generate_rows(6, seed=8)
    assert a == b
    assert a["image"] != c["image"]
    assert len({r["bytes"] for r in a["image"]}) == 6
    first = synthetic_bookcover_path(6, seed=7, cache_dir=tmp_path / "x").read_bytes()
    second = synthetic_bookcover_path(6, seed=7, cache_dir=tmp_path / "y").read_bytes()
    assert first == second


def test_cache_is_keyed_by_parameters(tmp_path):
    path = synthetic_bookcover_path(5, seed=1, cache_dir=tmp_path)
    stamp = path.stat().st_mtime_ns
    assert synthetic_bookcover_path(5, seed=1, cache_dir=tmp_path) == path
    assert path.stat().st_mtime_ns == stamp
    others = {synthetic_bookcover_path(5, seed=2, cache_dir=tmp_path),
              synthetic_bookcover_path(6, seed=1, cache_dir=tmp_path),
              synthetic_bookcover_path(5, seed=1, image_size=64, cache_dir=tmp_path)}
    assert path not in others and len(others) == 3
    small = synthetic_bookcover(5, seed=1, image_size=64, cache_dir=tmp_path)
    assert small[0]["image"].size == (64, 64)


def test_split_is_by_cover(covers, tmp_path):
    by_set = {}
    for row in covers:
        by_set.setdefault(row["set_name"], set()).add(row["image_id"])
    assert set(by_set) == {"train", "val", "test"}
    assert not (by_set["train"] & by_set["val"]) and not (by_set["train"] & by_set["test"])
    train, evaluation, _ = build_datasets(num_covers=60, seed=0, cache_dir=tmp_path)
    assert train and evaluation
    assert not {e["image_id"] for e in train} & {e["image_id"] for e in evaluation}


def test_blind_switch_makes_all_images_identical(tmp_path):
    train, _, _ = build_datasets(num_covers=20, seed=0, cache_dir=tmp_path)
    assert len({e["image"].tobytes() for e in train}) > 1
    blind = image_blind(train)
    pixels = {e["image"].tobytes() for e in blind}
    assert len(pixels) == 1
    assert blind[0]["image"].size == train[0]["image"].size and blind[0]["image"].mode == "RGB"
    assert blind[0]["image"].getpixel((5, 5)) == (128, 128, 128)
    assert [(e["question"], e["answer"]) for e in blind] == [(e["question"], e["answer"]) for e in train]
    assert blank_cover(112).tobytes() == blind[0]["image"].tobytes()
    switched, switched_eval, _ = build_datasets(num_covers=20, seed=0, cache_dir=tmp_path, blind=True)
    assert len({e["image"].tobytes() for e in switched + switched_eval}) == 1
    assert blank_cover((30, 20)).size == (30, 20)


def test_3000_qa_pairs_generate_uncached(tmp_path):
    start = time.perf_counter()
    dataset = synthetic_bookcover(num_covers=700, seed=0, cache_dir=tmp_path)
    seconds = time.perf_counter() - start
    pairs = sum(len(q) for q in dataset["questions"])
    print(f"\nsynthetic_bookcover: {pairs} QA pairs ({len(dataset)} covers) in {seconds:.2f} s, uncached")
    assert pairs >= 3000 and set(dataset.column_names) == COLUMNS
    assert all(4 <= len(q) <= 5 for q in dataset["questions"])
    png = dataset.cast_column("image", datasets.Image(decode=False))[0]["image"]["bytes"]
    assert Image.open(io.BytesIO(png)).format == "PNG"
