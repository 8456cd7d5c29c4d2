"""A Llama-3-style tokenizer trained locally (byte-level BPE) on the book-cover vocabulary.

It carries Llama 3's special tokens and a chat template that renders seed 000's prompt, so the
tiny models speak the same token protocol as meta-llama/Llama-3.2-11B-Vision-Instruct.
"""

from __future__ import annotations

from itertools import product

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
IMAGE = "<|image|>"
PYTHON_TAG = "<|python_tag|>"
PAD = "<|finetune_right_pad_id|>"
SPECIAL_TOKENS = (BOS, EOS, START_HEADER, END_HEADER, EOT, IMAGE, PYTHON_TAG, PAD)

# Renders, for one user turn [image, text] and add_generation_prompt=True:
# <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>{text}<|eot_id|>
# <|start_header_id|>assistant<|end_header_id|>\n\n
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|image|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

_GENERIC_TEXT = (
    "user assistant system the a an of and to in is it this that book cover image shows answer "
    "question based on do not explain yes no title author genre type written by what who which "
    "looking at from text colours colour design style read can be as I see shown the answer is "
    "red green blue yellow black white orange purple pink brown gray"
)


def tokenizer_corpus() -> list[str]:
    """Sentences covering the synthetic data's closed sets, questions, prompts and verbose phrasing."""
    from alignment.data import catalog

    names = list(catalog.GENRES) + list(catalog.AUTHORS) + list(catalog.TITLES) + ["Yes", "No"]
    questions = list(catalog.AUTHOR_QUESTIONS + catalog.TITLE_QUESTIONS + catalog.GENRE_QUESTIONS)
    questions += [q.format(genre=g) for q, g in product(catalog.YES_NO_QUESTIONS, catalog.GENRES)]
    lines = [_GENERIC_TEXT, catalog.DEFAULT_INSTRUCTION]
    lines += [f" {catalog.DEFAULT_INSTRUCTION} {q}" for q in questions]
    lines += [t.format(answer=a) for t, a in product(catalog.VERBOSE_TEMPLATES, names)]
    lines += [f"{t} by {a}, a {g} book." for t, a, g in zip(catalog.TITLES, catalog.AUTHORS, catalog.GENRES)]
    # Repeat the answers so that each becomes one or a few tokens.
    return lines + names * 20


def build_tokenizer(vocab_size: int = 1024):
    """Train the byte-level BPE and wrap it as a `PreTrainedTokenizerFast` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(tokenizer_corpus(), trainer)
    # Like Llama 3: the tokenizer prepends <|begin_of_text|> unless add_special_tokens=False.
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, core.token_to_id(BOS))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    return tokenizer
