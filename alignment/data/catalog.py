"""The closed sets of the synthetic book covers and the visual cue that carries each answer.

A tiny vision encoder learns colour, shape and marks in minutes but does not learn to read
(DESIGN.md, "The embedded default"), so every answer has a cue of that kind as well as its text:
a genre is a background colour plus an emblem shape, an author is a coloured corner mark, a title
is a coloured band with a stripe pattern. The text is rendered too, for realism and real models.
"""

from __future__ import annotations

# genre -> (background RGB, emblem shape). Names follow OCR-VQA's categories.
GENRES: dict[str, tuple[tuple[int, int, int], str]] = {
    "Cookbooks, Food & Wine": ((200, 60, 40), "circle"),
    "Travel": ((40, 120, 200), "triangle"),
    "Romance": ((220, 110, 170), "heart"),
    "Science Fiction & Fantasy": ((40, 30, 90), "star"),
    "History": ((140, 100, 50), "square"),
    "Children's Books": ((250, 210, 40), "diamond"),
    "Health, Fitness & Dieting": ((60, 170, 80), "cross"),
    "Mystery, Thriller & Suspense": ((30, 30, 30), "ring"),
}

# author -> RGB of the mark in the top-left corner.
AUTHORS: dict[str, tuple[int, int, int]] = {
    "Maria Lopez": (255, 0, 0),
    "John Carter": (0, 255, 0),
    "Emily Stone": (0, 0, 255),
    "David Brown": (255, 255, 0),
    "Anna Weber": (255, 0, 255),
    "Kenji Sato": (0, 255, 255),
    "Laura Chen": (255, 128, 0),
    "Peter Novak": (128, 0, 255),
}

# title -> (band RGB, stripe pattern) drawn across the lower third.
TITLES: dict[str, tuple[tuple[int, int, int], str]] = {
    "The Silent River": ((255, 255, 255), "horizontal"),
    "Winter Garden": ((0, 0, 0), "vertical"),
    "A Map of Stars": ((255, 60, 60), "diagonal"),
    "Kitchen Secrets": ((60, 255, 60), "horizontal"),
    "The Last Train": ((60, 60, 255), "vertical"),
    "Under the Moon": ((255, 200, 0), "diagonal"),
    "Stone and Salt": ((0, 200, 200), "checks"),
    "The Blue Door": ((200, 0, 200), "dots"),
}

# OCR-VQA's question templates. `{genre}` is filled with a genre name.
AUTHOR_QUESTIONS = ("Who wrote this book?", "Who is the author of this book?")
TITLE_QUESTIONS = ("What is the title of this book?",)
GENRE_QUESTIONS = ("What type of book is this?", "What is the genre of this book?")
YES_NO_QUESTIONS = ("Is this a {genre} book?", "Is this book related to {genre}?")

DEFAULT_INSTRUCTION = "Answer question based on the image, do not explain"

# Phrases that verbose, explaining answers are built from (the habit seed 000 trained away).
VERBOSE_TEMPLATES = (
    "Looking at the book cover, I can see that the answer is {answer}, as shown by the design.",
    "Based on the cover shown in the image, the answer is {answer}.",
    "The image shows a book cover. From the text and colours on it, the answer is {answer}.",
    "{answer}. This can be read from the cover, which shows the title, the author and the style of the book.",
)
# Which explaining templates the SFT mix may use: "answer_first" ones start with the concise answer, so
# the concise answer is a prefix of the explaining one and the two part only at the token after it.
VERBOSE_STYLES = {
    "any": VERBOSE_TEMPLATES,
    "answer_first": tuple(t for t in VERBOSE_TEMPLATES if t.startswith("{answer}")),
}
