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

