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
from alignment.errors import ConfigError

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


# Processors (by class-name prefix) whose model reads an image in string content as a placeholder before
# the text, for a chat template that renders string content only (a chat LM's): LLaVA's `<image>\n`.
STRING_CONTENT_IMAGES = {"Llava": "{image}\n"}


def string_content_image(processor: Any) -> str | None:
    """The placeholder text of one image in string content (`STRING_CONTENT_IMAGES`, `{image}` the
    processor's image token), or None where the model has no such convention."""
    name = type(processor).__name__
    return next((text for prefix, text in STRING_CONTENT_IMAGES.items() if name.startswith(prefix)), None)


def prompt_format(processor: Any, n_images: int = 1) -> PromptFormat:
    """The processor's `PromptFormat` for a user turn showing `n_images` images (each an image part, in
    order, before the text), read off its chat template once per count (cached on the processor).

    Without a chat template, seed 000's Llama 3 format with the processor's image placeholder. A BOS
    the tokenizer would add but the template leaves out is put in front (collators tokenize with
    ``add_special_tokens=False``); the answer's opening is what the template writes after the
    generation prompt before an assistant message's text (Idefics3: a space), and its closing what it
    writes after that text (its trailing whitespace dropped), else the tokenizer's EOS.

    A template that does not render image parts (a chat LM's, rendering string content only) renders
    the turn as string content with the model's placeholder (`string_content_image`: LLaVA's
    ``<image>\\n`` before the text); without one, `ConfigError` names the template and the
    `model.chat_template` key."""
    cache = getattr(processor, "_vlm_align_prompt_formats", None)
    if cache is not None and n_images in cache:
        return cache[n_images]
    image_token = image_token_of(processor)
    tokenizer = getattr(processor, "tokenizer", processor)
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    fmt = _template_format(processor, template, n_images, image_token) if template else \
        seed_000_format(n_images, image_token)
    try:
        if cache is None:
            cache = processor._vlm_align_prompt_formats = {}
        cache[n_images] = fmt
    except AttributeError:
        pass
    return fmt


def _template_format(processor: Any, template: str, n_images: int, image_token: str) -> PromptFormat:
    """`prompt_format` from a chat template: image parts first, else string content with the model's placeholder."""
    tokenizer = getattr(processor, "tokenizer", processor)
    text = [{"type": "text", "text": _SENTINEL}]
    turns = _rendered_turns(tokenizer, template, [{"type": "image"}] * n_images + text, text,
                            [{"type": "text", "text": _ANSWER}])
    placeholder = string_content_image(processor)
    if turns is None and placeholder is not None:
        turns = _rendered_turns(tokenizer, template, placeholder.format(image=image_token) * n_images + _SENTINEL,
                                _SENTINEL, _ANSWER)
    if turns is None:
        raise ConfigError(_unrendered_images(processor, template))
    prompt, answered = turns
    before, after = prompt.split(_SENTINEL)
    head, tail = answered.split(_ANSWER)
    end_of_turn = tail.rstrip() or (tokenizer.eos_token or "")
    bos = getattr(tokenizer, "bos_token", None)
    if bos and not before.startswith(bos) and _adds_bos(tokenizer):
        before = bos + before
    return PromptFormat(before=before, after=after, end_of_turn=end_of_turn, image_token=image_token,
                        separator=" " if before.endswith(image_token) else "",
                        answer_prefix=head[len(prompt):] if head.startswith(prompt) else "")


def _rendered_turns(tokenizer: Any, template: str, user: Any, text_only: Any, answer: Any) -> tuple[str, str] | None:
    """(the user turn + generation prompt, the user turn + the answered assistant turn) for message contents
    `user` (images and text) and `answer`, or None where the template does not render them: it fails, leaves
    out the text (a list of parts written as its Python repr), or writes the images as nothing (the turn
    renders as `text_only`, the same content without its images, does)."""
    def prompt_of(content: Any) -> str:
        return _render(tokenizer, template, [{"role": "user", "content": content}], True)

    try:
        prompt = prompt_of(user)
        answered = _render(tokenizer, template, [{"role": "user", "content": user},
                                                 {"role": "assistant", "content": answer}], False)
        images_shown = user == text_only or prompt != prompt_of(text_only)
    except Exception:  # noqa: BLE001 - jinja's errors on content it cannot render (a list joined to a string)
        return None
    if prompt.count(_SENTINEL) != 1 or answered.count(_ANSWER) != 1 or not images_shown:
        return None
    return prompt, answered


def _unrendered_images(processor: Any, template: str) -> str:
    """One line: which template does not render image parts, and how to pass one that does."""
    tokenizer = getattr(processor, "tokenizer", processor)
    source = "processor's" if getattr(processor, "chat_template", None) else "tokenizer's"
    name = getattr(tokenizer, "name_or_path", "") or type(processor).__name__
    start = " ".join(template.split())[:72]
    return (f"model.chat_template: the {source} chat template of {name} does not render image parts (a message "
            f"content [{{'type': 'image'}}, {{'type': 'text', ...}}]; it starts {start!r}...), and "
            f"{type(processor).__name__} has no image placeholder for string content: pass a template that renders "
            "image parts, as model.chat_template=path/to/template.jinja (e.g. the base model's chat_template.jinja)")


def _adds_bos(tokenizer: Any) -> bool:
    try:
        ids = tokenizer("a")["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that cannot say: assume the template is complete
        return False
    return bool(ids) and ids[0] == tokenizer.bos_token_id
