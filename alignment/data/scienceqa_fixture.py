"""A small ScienceQA-format fixture, generated: ``problems.json`` + ``images/<split>/<pid>/image.png``
exactly as the ScienceQA repo lays them out, for tests and the tiny recipe.

Problems span the three subjects (natural, social, language science), grades 1-12, image, text
(hint) and no context, and several categories; answers are readable from the image or the hint, so
a model can learn them:

- natural science, image: the colour of a disc (category "Colors");
- natural science, image: the shape drawn (category "Shapes");
- social science, image + hint: which region is marked; the hint names its colour (category "Geography");
- social science, hint only: a fact stated in the hint (category "Civics");
- language science, no context: which word is the animal (category "Word meaning").
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60), "yellow": (240, 210, 40)}
SHAPES = ("circle", "square", "triangle")
REGIONS = ("north", "south", "east", "west")
ANIMALS = ("cat", "horse", "fox", "owl")
THINGS = ("chair", "spoon", "lamp", "brick")
CITIES = {"Alden": "Marrow", "Brisk": "Tolland", "Corva": "Penrith", "Dunmar": "Oskar"}


def _draw(kind: str, value: str, size: int = 112) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 245, 240))
    d = ImageDraw.Draw(image)
    if kind == "color":
        d.ellipse((20, 20, 92, 92), fill=COLORS[value])
    elif kind == "shape":
        box = (24, 24, 88, 88)
        {"circle": lambda: d.ellipse(box, fill=(30, 30, 30)), "square": lambda: d.rectangle(box, fill=(30, 30, 30)),
         "triangle": lambda: d.polygon([(56, 20), (92, 92), (20, 92)], fill=(30, 30, 30))}[value]()
    else:  # a map with one marked region
        d.rectangle((8, 8, 104, 104), outline=(0, 0, 0), width=2)
        boxes = {"north": (8, 8, 104, 40), "south": (8, 72, 104, 104), "west": (8, 8, 40, 104), "east": (72, 8, 104, 104)}
        d.rectangle(boxes[value], fill=(200, 60, 160))
    return image


def write_scienceqa_fixture(folder: str | Path, num_problems: int = 120, seed: int = 0,
                            splits: tuple[float, float] = (0.7, 0.15)) -> Path:
    """Write ``num_problems`` problems (train/val/test by ``splits``) into ``folder``; returns the
    path of ``problems.json``. Deterministic in ``seed``."""
    folder = Path(folder)
    rng = random.Random(seed)
    problems = {}
    for i in range(num_problems):
        pid = str(i + 1)
        r = rng.random()
        split = "train" if r < splits[0] else "val" if r < splits[0] + splits[1] else "test"
        template = i % 5
        grade = rng.randint(1, 12)
        image = None
        hint = ""
        if template == 0:
            answer = rng.choice(list(COLORS))
            choices = rng.sample([c for c in COLORS if c != answer], 2) + [answer]
            question, subject, category, picture = "What color is the disc?", "natural science", "Colors", ("color", answer)
        elif template == 1:
            answer = rng.choice(SHAPES)
            choices = list(SHAPES)
            question, subject, category, picture = "Which shape is shown?", "natural science", "Shapes", ("shape", answer)
        elif template == 2:
            answer = rng.choice(REGIONS)
            choices = rng.sample([x for x in REGIONS if x != answer], 1) + [answer]
            question, subject, category, picture = "Which region is marked?", "social science", "Geography", ("map", answer)
            hint = "The marked region is shaded pink."
        elif template == 3:
            country = rng.choice(list(CITIES))
            answer = CITIES[country]
            choices = rng.sample([c for c in CITIES.values() if c != answer], 2) + [answer]
            question, subject, category, picture = f"What is the capital of {country}?", "social science", "Civics", None
            hint = f"{country} is a country. Its capital city is {answer}."
        else:
            answer = rng.choice(ANIMALS)
            choices = rng.sample(THINGS, 1) + [answer]
            question, subject, category, picture = "Which word names an animal?", "language science", "Word meaning", None
        rng.shuffle(choices)
        if picture is not None:
            image = "image.png"
            target = folder / "images" / split / pid
            target.mkdir(parents=True, exist_ok=True)
            _draw(*picture).save(target / image)
        problems[pid] = {
            "question": question, "choices": choices, "answer": choices.index(answer), "hint": hint,
            "image": image, "task": "closed choice", "grade": f"grade{grade}", "subject": subject,
            "topic": category.lower(), "category": category, "skill": category.lower(), "lecture": "",
            "solution": "", "split": split,
        }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "problems.json"
    path.write_text(json.dumps(problems, indent=1))
    return path


if __name__ == "__main__":
    import sys

    print(write_scienceqa_fixture(sys.argv[1] if len(sys.argv) > 1 else "data/scienceqa_fixture"))


FIXTURE = "scienceqa_fixture"  # data.source name of the generated fixture


def scienceqa_fixture_path(num_problems: int = 120, seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """problems.json of the fixture, generated on first use under the data cache (atomically)."""
    import os
    import shutil
    import tempfile

    from alignment.data.synthetic import default_cache_dir

    root = Path(cache_dir if cache_dir is not None else default_cache_dir())
    folder = root / f"scienceqa_fixture-v1-{num_problems}-{seed}"
    if not (folder / "problems.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".scienceqa-", dir=root))
        try:
            write_scienceqa_fixture(staging, num_problems, seed)
            if not (folder / "problems.json").exists():
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder / "problems.json"
