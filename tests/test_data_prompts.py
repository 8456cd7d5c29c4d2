"""Seed 000's prompt, token-exact."""

from alignment.data import catalog, prompts
from alignment.data.prompts import render_completion, render_prompt

SEED_000 = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    "<|image|> Answer question based on the image, do not explain {question}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def test_prompt_matches_seed_000_literally():
    question = "Who wrote this book?"
    assert render_prompt(question) == SEED_000.format(question=question)
    assert catalog.DEFAULT_INSTRUCTION == "Answer question based on the image, do not explain"


def test_completion_ends_with_eot():
    assert render_completion("Maria Lopez") == "Maria Lopez<|eot_id|>"


def test_instruction_is_configurable():
    prompt = render_prompt("Is this a Travel book?", instruction="Reply in one word.")
    assert "<|image|> Reply in one word. Is this a Travel book?<|eot_id|>" in prompt
    assert catalog.DEFAULT_INSTRUCTION not in prompt


def test_empty_instruction_leaves_no_double_space():
    assert "<|image|> Who wrote this book?<|eot_id|>" in render_prompt("Who wrote this book?", instruction="")


def test_docstring_explains_the_backslash():
    assert "backslash" in prompts.__doc__ and "\\n\\n" in prompts.__doc__


def test_prompt_token_ids_are_the_special_tokens_and_text_pieces():
    """ids(prompt) == [BOS, SH] + ids("user") + [EH] + ids("\\n\\n") + [IMG] + ids(" instr q") + [EOT, SH]
    + ids("assistant") + [EH] + ids("\\n\\n"), with the locally built Llama-3-style tokenizer."""
    from alignment.models import load_processor

    tokenizer = load_processor("tiny-mllama").tokenizer
    question = "What is the genre of this book?"

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def special(token):
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert token_id != tokenizer.unk_token_id and token_id is not None
        return [token_id]

    bos, sh, eh, img, eot = (special(t) for t in prompts.SPECIAL_TOKENS)
    expected = (bos + sh + ids("user") + eh + ids("\n\n") + img
                + ids(f" {catalog.DEFAULT_INSTRUCTION} {question}") + eot
                + sh + ids("assistant") + eh + ids("\n\n"))
    assert ids(render_prompt(question)) == expected
    assert ids(render_completion("Yes")) == ids("Yes") + eot


def test_the_tiny_processors_template_renders_seed_000():
    from alignment.data.prompts import SEED_000 as FORMAT
    from alignment.data.prompts import prompt_format
    from alignment.models import load_processor

    for name in ("tiny-mllama", "tiny-llava"):
        assert prompt_format(load_processor(name)) == FORMAT, name


def test_prompt_format_reads_any_template():
    """A LLaVA-1.5-style template (no BOS in it, no end-of-turn token): the BOS the tokenizer adds is put
    in front, the placeholder is the processor's, an answer is opened as the template writes it after
    `ASSISTANT:` (a space) and closed by the tokenizer's EOS."""
    from types import SimpleNamespace

    from alignment.data.prompts import prompt_format
    from alignment.models.standins import build_llama3_tokenizer

    template = ("{% for m in messages %}{{ m['role'].upper() + ': ' }}{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                "{{ ' ' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    tokenizer = build_llama3_tokenizer("<image>", template)
    tokenizer.eos_token = "<|end_of_text|>"
    processor = SimpleNamespace(tokenizer=tokenizer, chat_template=template, image_token="<image>")
    fmt = prompt_format(processor)
    assert fmt.prompt("Who wrote this book?", "") == "<|begin_of_text|>USER: <image>\nWho wrote this book? ASSISTANT:"
    assert fmt.completion("Maria Lopez") == " Maria Lopez<|end_of_text|>"
    assert fmt.separator == "" and fmt.image_token == "<image>"


def test_the_answer_is_opened_as_idefics3s_template_opens_it():
    """Idefics3-8B-Llama3's template: the generation prompt ends `Assistant:` and an answer is written
    `Assistant: answer<end_of_utterance>`; prompt + completion is the template's own answered turn, the
    space belonging to the completion (so that Llama 3's split keeps `:` apart from ` Laura`)."""
    from alignment.data.prompts import prompt_format
    from alignment.models import generic

    tokenizer = generic.build_tokenizer(split="llama3", chat_template=generic.IDEFICS3_TEMPLATE)
    processor = generic.build_processor(tokenizer)
    fmt = prompt_format(processor)
    assert fmt.prompt("Who wrote this book?", "") == "<|begin_of_text|>User:<image> Who wrote this book?<end_of_utterance>\nAssistant:"
    assert fmt.answer_prefix == " " and fmt.completion("Laura Smith") == " Laura Smith<end_of_utterance>"
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " Who wrote this book?"}]}
    answered = tokenizer.apply_chat_template(
        [user, {"role": "assistant", "content": [{"type": "text", "text": "Laura Smith"}]}], tokenize=False)
    assert answered == fmt.prompt("Who wrote this book?", "") + fmt.completion("Laura Smith") + "\n"

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    whole = ids(fmt.prompt("Who wrote this book?", "") + fmt.completion("Laura Smith"))
    assert whole[-len(ids(fmt.completion("Laura Smith"))):] == ids(fmt.completion("Laura Smith"))


def test_a_text_only_template_gets_llavas_placeholder_in_string_content():
    """A LLaVA whose chat template is its Llama 3 LM's (string content only: a list of parts would be
    rendered as its Python repr): the turn is rendered as string content with `<image>\\n` per image before
    the text, which is exactly what the LLaVA template that renders image parts gives."""
    from alignment.data.prompts import prompt_format
    from alignment.models import load_processor
    from alignment.models.standins import LLAMA3_TEXT_TEMPLATE

    reference = load_processor("standin-llava")
    text_only = load_processor("standin-llava")
    text_only.chat_template = None
    text_only.tokenizer.chat_template = LLAMA3_TEXT_TEMPLATE
    for n_images in (1, 2):
        assert prompt_format(text_only, n_images) == prompt_format(reference, n_images), n_images
    assert prompt_format(text_only).prompt("Who wrote this book?", "") == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWho wrote this book?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_a_template_that_renders_no_image_parts_is_one_config_error():
    """No image placeholder convention for string content (Idefics3) and a text-only template: one line
    naming the template and the `model.chat_template` key, never the unpacking traceback."""
    import pytest

    from alignment.config import ConfigError
    from alignment.data.prompts import prompt_format
    from alignment.models import generic
    from alignment.models.standins import LLAMA3_TEXT_TEMPLATE

    processor = generic.build_processor(generic.build_tokenizer(chat_template=LLAMA3_TEXT_TEMPLATE))
    with pytest.raises(ConfigError) as error:
        prompt_format(processor)
    message = str(error.value)
    assert message.startswith("model.chat_template: the processor's chat template of ") and "\n" not in message
    assert "does not render image parts" in message and "{% set loop_messages = messages %}" in message
    assert "model.chat_template=path/to/template.jinja" in message
