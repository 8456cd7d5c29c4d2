"""Shared by the policy and generation tests: the tiny families, a two-row batch with images and labels."""

import torch
from PIL import Image

from alignment.policy import MultimodalPolicy

FAMILIES = ["tiny-mllama", "tiny-llava"]
PROMPT = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|> Answer question based on the image,"
    " do not explain {q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
)


def make_batch(policy, answers=("Maria Lopez", "Travel"), padding_side="right", with_answer=True):
    """Two rows, each with its own image; labels on the answer tokens only."""
    colours = [(200, 60, 40), (40, 120, 200)]
    images = [Image.new("RGB", (112, 112), c) for c in colours[: len(answers)]]
    prompts = [PROMPT.format(q="Who wrote this book?") for _ in answers]
    texts = [p + (a + "<|eot_id|>" if with_answer else "") for p, a in zip(prompts, answers)]
    tok = policy.processor.tokenizer
    tok.padding_side = padding_side
    batch = dict(policy.processor(images=[[im] for im in images] if policy.family.__name__.endswith("mllama") else images,
                                  text=texts, return_tensors="pt", padding=True, add_special_tokens=False))
    tok.padding_side = "right"
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    for i, p in enumerate(prompts):
        n_prompt = len(policy.processor(images=[images[i]] if not policy.family.__name__.endswith("mllama") else [[images[i]]],
                                        text=[p], add_special_tokens=False)["input_ids"][0])
        labels[i, :n_prompt] = -100
    batch["labels"] = labels
    batch["image_index"] = torch.arange(len(answers))
    return batch


def load(name, quantization="none"):
    return MultimodalPolicy.from_pretrained(name, quantization=quantization)
