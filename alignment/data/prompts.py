"""Seed 000's prompt format: one image, one question, a concise answer.

The seed prints the prompt as::

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\<|image|> Answer question ...

The lone backslash after the user header is read as Llama 3's ``"\\n\\n"`` that follows every
``<|end_header_id|>`` (lost when the seed was typeset), so the rendered prompt is::

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n<|image|> {instruction} {question}
    <|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n

(one line, wrapped here) and the completion the model learns is ``{answer}<|eot_id|>``.
"""

from __future__ import annotations

from alignment.data.catalog import DEFAULT_INSTRUCTION

BEGIN_OF_TEXT = "<|begin_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
IMAGE = "<|image|>"

# The special tokens the prompt uses, in order of first appearance.
SPECIAL_TOKENS = (BEGIN_OF_TEXT, START_HEADER, END_HEADER, IMAGE, EOT)


def render_prompt(question: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The user turn with one image and the open assistant header (an empty ``instruction`` is left out)."""
    user = " ".join(part for part in (IMAGE, instruction, question) if part)  # no double space
    return f"{BEGIN_OF_TEXT}{START_HEADER}user{END_HEADER}\n\n{user}{EOT}{START_HEADER}assistant{END_HEADER}\n\n"


def render_completion(answer: str) -> str:
    """The assistant's answer closed by ``<|eot_id|>`` (the stop token the model must learn)."""
    return f"{answer}{EOT}"
