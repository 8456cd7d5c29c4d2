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

# Llama 3's pre-tokenizer split (its tokenizer.json, before the byte-level mapping): unlike GPT-2's, a
# punctuation mark or symbol joins the word after it (`[^\r\n\p{L}\p{N}]?\p{L}+`), so `Assistant:Laura`
# splits as `Assistant` `:Laura`, and `: Laura` as `:` ` Laura`.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = ("gpt2", "llama3")

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


def glued_corpus() -> list[str]:
    """`Field:value` lines (`Author:Laura Smith`, `Genre:Travel`): text where a colon touches the next word,
    from which a BPE trained with Llama 3's split learns tokens such as `:Laura` (as Llama 3's own has)."""
    from alignment.data import catalog

    fields = (("Author", catalog.AUTHORS), ("Title", catalog.TITLES), ("Genre", catalog.GENRES), ("Answer", ("Yes", "No")))
    return [f"{field}:{value}" for field, values in fields for value in values] * 20


def pre_tokenizer(split: str = "gpt2"):
    """The byte-level pre-tokenizer: GPT-2's split (`ByteLevel`'s own regex), or Llama 3's split
    (`LLAMA3_SPLIT`, isolated) followed by the byte-level mapping, as in Llama 3's tokenizer.json."""
    from tokenizers import Regex, pre_tokenizers

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def build_tokenizer(vocab_size: int = 1024, split: str = "gpt2"):
    """Train the byte-level BPE and wrap it as a `PreTrainedTokenizerFast` (deterministic). `split="llama3"`:
    Llama 3's pre-tokenizer, trained on `glued_corpus()` too (so that it merges across a colon)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizer(split)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(tokenizer_corpus() + (glued_corpus() if split == "llama3" else []), trainer)
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
