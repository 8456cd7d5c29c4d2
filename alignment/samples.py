"""The held-out answers a run shows: each stage's answers to its first few test (else val) examples.

A stage's evaluation already generates greedy answers and keeps the first ones in its metrics
(`eval.samples`, `test.samples` of report.json: question, reference `answer`, `prediction`). At the
end of the stage they are saved with the images they were asked about, for the run page
(`alignment.run_page`) to put each stage's answer side by side:

    <output_dir>/<stage>/samples.json   {"stage", "type", "split": "test" | "val", "examples": [
        {"id", "image_id", "images": ["samples/<sha1>.png", ...], "question", "reference", "answer",
         "reward" (online stages only)}]}
    <output_dir>/<stage>/samples/<sha1>.png   each image once, at most MAX_SIDE px on its longer side

Image paths are relative to the stage folder; a file's name is a hash of its pixels, so one image
asked about twice is stored once. No generation happens here.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

SAMPLES_FILE = "samples.json"
IMAGES_DIR = "samples"
MAX_SIDE = 448  # px: enough for `vlm-align generate --image` and a page thumbnail, small on disk


def _images_of(example: dict) -> list:
    """The PIL images an example shows, in placeholder order (`image`, or `images`)."""
    images = example.get("images") if example.get("images") is not None else [example.get("image")]
    return [image for image in images if hasattr(image, "save") and hasattr(image, "tobytes")]


def _save_image(image, folder: Path) -> str:
    """`image` as `folder/<sha1 of its pixels>.png` (RGB, longer side at most MAX_SIDE); its file name."""
    rgb = image.convert("RGB")
    digest = hashlib.sha1(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()[:16]
    path = folder / f"{digest}.png"
    if not path.exists():
        rgb.thumbnail((MAX_SIDE, MAX_SIDE))
        tmp = path.with_suffix(".tmp.png")
        rgb.save(tmp, format="PNG")
        os.replace(tmp, path)
    return path.name


def held_out_records(examples: list[dict], samples: list[dict], stage_dir: Path) -> list[dict]:
    """One record per shown sample: `samples[i]` (question, `answer` = reference, `prediction`) is the
    answer to `examples[i]` (the evaluation keeps them in order). A sample whose question is not
    `examples[i]`'s is left out rather than paired with the wrong image. Saves the images under
    `stage_dir/samples/`."""
    folder = Path(stage_dir) / IMAGES_DIR
    records = []
    for example, sample in zip(examples, samples):
        if example.get("question") != sample.get("question"):
            continue
        folder.mkdir(parents=True, exist_ok=True)
        record = {"id": example.get("id"), "image_id": example.get("image_id"),
                  "images": [f"{IMAGES_DIR}/{_save_image(image, folder)}" for image in _images_of(example)],
                  "question": sample["question"], "reference": sample.get("answer", ""),
                  "answer": sample.get("prediction", "")}
        if "reward" in sample:
            record["reward"] = sample["reward"]
        records.append(record)
    return records


def write_samples(stage_dir: Path, stage_name: str, stage_type: str, split: str, examples: list[dict],
                  samples: list[dict]) -> Path | None:
    """`stage_dir/samples.json` (and its images) from an evaluation's `samples` on `examples` of
    `split` ("test" or "val"); None (nothing written) when the evaluation kept no answers."""
    records = held_out_records(examples, samples or [], stage_dir)
    if not records:
        return None
    path = Path(stage_dir) / SAMPLES_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"stage": stage_name, "type": stage_type, "split": split, "examples": records},
                              indent=2, default=str))
    os.replace(tmp, path)
    return path


def write_stage_samples(stage_dir: Path, stage_name: str, stage_type: str, metrics: dict, test: dict | None,
                        eval_examples: list[dict], test_examples: list[dict]) -> Path | None:
    """The stage's shown answers on the test split when its evaluation ran there, else on val."""
    if test and test.get("samples"):
        return write_samples(stage_dir, stage_name, stage_type, "test", test_examples, test["samples"])
    return write_samples(stage_dir, stage_name, stage_type, "val", eval_examples, (metrics or {}).get("samples"))


def read_samples(stage_dir: Path) -> dict | None:
    """A stage's samples.json, or None when it has none (a reward stage, a run made before it existed)."""
    path = Path(stage_dir) / SAMPLES_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())
