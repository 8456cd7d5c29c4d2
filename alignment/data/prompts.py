"""Seed 000's prompt format: one image, one question, a concise answer, rendered by the model's
own chat template.

The seed prints the prompt as::

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\<|image|> Answer question ...

The lone backslash after the user header is read as Llama 3's ``"\\n\\n"`` that follows every
``<|end_header_id|>`` (lost when the seed was typeset), so the rendered prompt is::

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n<|image|> {instruction} {question}
    <|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n

(one line, wrapped here) and the completion the model learns is ``{answer}<|eot_id|>``. That is
exactly what Llama 3.2 Vision's chat template renders for a user turn [image, " {instruction}
{question}"]. For another model, `prompt_format(processor)` renders the same turn with that model's
template and image placeholder (LLaVA's ``<image>``), and reads off what closes an assistant turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alignment.data.catalog import DEFAULT_INSTRUCTION

BEGIN_OF_TEXT = "<|begin_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
IMAGE = "<|image|>"

# The special tokens the prompt uses, in order of first appearance.
SPECIAL_TOKENS = (BEGIN_OF_TEXT, START_HEADER, END_HEADER, IMAGE, EOT)

_SENTINEL = "\x00VLMALIGN\x00"
_ANSWER = "\x00VLMALIGN_ANSWER\x00"


@dataclass(frozen=True)
class PromptFormat:
    """One model's rendering of a one-image user turn: ``before`` + text + ``after`` is the prompt
    (open assistant header included); an answer is closed by ``end_of_turn``."""

    before: str  # BOS, headers and the image placeholder, up to the user's text
    after: str  # from the end of the user's text to the open assistant header
    end_of_turn: str  # what closes an assistant answer (Llama 3: <|eot_id|>)
    image_token: str  # the placeholder one image takes in the text
    separator: str = " "  # between the placeholder and the text when the template glues them together
    # What the template writes between the open assistant header and the answer's text (Idefics3 and
    # SmolVLM: a space, `Assistant:` then `Assistant: answer`); part of the completion, so that the
    # boundary between prompt and completion is the template's own.
    answer_prefix: str = ""

    def prompt(self, question: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
        text = " ".join(part for part in (instruction, question) if part)
        return f"{self.before}{self.separator if text else ''}{text}{self.after}"

    def completion(self, answer: str) -> str:
        return f"{self.answer_prefix}{answer}{self.end_of_turn}"


# Seed 000's format (Llama 3.2 Vision's template), used when no processor is given.
SEED_000 = PromptFormat(before=f"{BEGIN_OF_TEXT}{START_HEADER}user{END_HEADER}\n\n{IMAGE}",
                        after=f"{EOT}{START_HEADER}assistant{END_HEADER}\n\n", end_of_turn=EOT, image_token=IMAGE)


def seed_000_format(n_images: int = 1, image_token: str = IMAGE) -> PromptFormat:
    """Seed 000's Llama 3 format with ``n_images`` placeholders ``image_token`` (for a processor without a
    chat template, or a bare tokenizer)."""
    return PromptFormat(before=SEED_000.before.replace(IMAGE, image_token * n_images), after=SEED_000.after,
                        end_of_turn=SEED_000.end_of_turn, image_token=image_token)


def render_prompt(question: str, instruction: str = DEFAULT_INSTRUCTION, fmt: PromptFormat = SEED_000) -> str:
    """The user turn with one image and the open assistant header (an empty ``instruction`` is left out)."""
    return fmt.prompt(question, instruction)


def render_completion(answer: str, fmt: PromptFormat = SEED_000) -> str:
    """The assistant's answer closed by the turn's end token (Llama 3: ``<|eot_id|>``, the stop token)."""
    return fmt.completion(answer)


def _render(tokenizer: Any, template: str, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=generation_prompt,
                                         tokenize=False)


def image_token_of(processor: Any) -> str:
    """The text placeholder of one image: the processor's `image_token` (``<|image|>``, ``<image>``)."""
    token = getattr(processor, "image_token", None)
    if token:
        return str(token)
    tokenizer = getattr(processor, "tokenizer", processor)
    token_id = getattr(processor, "image_token_id", None)
    return tokenizer.convert_ids_to_tokens(token_id) if token_id is not None else IMAGE


def prompt_format(processor: Any, n_images: int = 1) -> PromptFormat:
    """The processor's `PromptFormat` for a user turn showing `n_images` images (each an image part, in
    order, before the text), read off its chat template once per count (cached on the processor).

    Without a chat template, seed 000's Llama 3 format with the processor's image placeholder. A BOS
    the tokenizer would add but the template leaves out is put in front (collators tokenize with
    ``add_special_tokens=False``); the answer's opening is what the template writes after the
    generation prompt before an assistant message's text (Idefics3: a space), and its closing what it
    writes after that text (its trailing whitespace dropped), else the tokenizer's EOS."""
    cache = getattr(processor, "_vlm_align_prompt_formats", None)
    if cache is not None and n_images in cache:
        return cache[n_images]
    image_token = image_token_of(processor)
    tokenizer = getattr(processor, "tokenizer", processor)
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    if not template:
        fmt = seed_000_format(n_images, image_token)
    else:
        parts = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": _SENTINEL}]
        user = {"role": "user", "content": parts}
        prompt = _render(tokenizer, template, [user], True)
        before, after = prompt.split(_SENTINEL)
        answered = _render(tokenizer, template, [user, {"role": "assistant", "content": [{"type": "text", "text": _ANSWER}]}],
                           False)
        head, tail = answered.split(_ANSWER)
        end_of_turn = tail.rstrip() or (tokenizer.eos_token or "")
        bos = getattr(tokenizer, "bos_token", None)
        if bos and not before.startswith(bos) and _adds_bos(tokenizer):
            before = bos + before
        fmt = PromptFormat(before=before, after=after, end_of_turn=end_of_turn, image_token=image_token,
                           separator=" " if before.endswith(image_token) else "",
                           answer_prefix=head[len(prompt):] if head.startswith(prompt) else "")
    try:
        if cache is None:
            cache = processor._vlm_align_prompt_formats = {}
        cache[n_images] = fmt
    except AttributeError:
        pass
    return fmt


def _adds_bos(tokenizer: Any) -> bool:
    try:
        ids = tokenizer("a")["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that cannot say: assume the template is complete
        return False
    return bool(ids) and ids[0] == tokenizer.bos_token_id
