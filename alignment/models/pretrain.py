"""Pretrain the tiny base once on cover captions, the way users start from a pretrained checkpoint.

    python -m alignment.models.pretrain --model tiny-mllama --steps 500

A randomly initialised tiny model cannot be aligned with LoRA alone: its frozen final norm and LM
head cap the logit scale (measured: LoRA-only SFT stalls at 2.8 nats/token on two examples, while
full fine-tuning reaches 0.02). So the tiny base is trained in full, once, on captions of covers
drawn with a seed no recipe uses ("Title: ... Author: ... Genre: ..." in shuffled field order)
and plain questions about them phrased unlike the recipes' templates (see `captions`),
and shipped under `alignment/models/assets/<name>/` (bf16 safetensors). Recipes then fine-tune it
with (Q)LoRA on question answering, which it has never seen.
"""

from __future__ import annotations

import argparse
import io
import random
import time
from pathlib import Path

import torch

PRETRAIN_SEED = 9_999  # cover seed for pretraining; recipes use other seeds
ASSETS = Path(__file__).parent / "assets"


def captions(rows: dict, rng: random.Random) -> list[str]:
    """Per cover, a caption (title, author and genre in shuffled order) or a plain question and
    answer about it, phrased unlike OCR-VQA's templates and without the chat format: the
    general ability an instruction-tuned checkpoint brings, not the recipes' task."""
    from alignment.data import catalog

    genres = list(catalog.GENRES)
    out = []
    for title, author, genre in zip(rows["title"], rows["authorName"], rows["genre"]):
        fields = [f"Title: {title}.", f"Author: {author}.", f"Genre: {genre}."]
        rng.shuffle(fields)
        asked = genre if rng.random() < 0.5 else rng.choice([g for g in genres if g != genre])
        qa = rng.choice([
            ("Name the author on this cover.", author),
            ("Name the title on this cover.", title),
            ("Which category does this cover belong to?", genre),
            (f"Does this cover belong to the {asked} category?", "Yes" if asked == genre else "No"),
        ])
        out.append(" ".join(fields) if rng.random() < 0.5 else f"Question: {qa[0]} Answer: {qa[1]}")
    return out


def pretrain(name: str = "tiny-mllama", steps: int = 500, batch_size: int = 32, lr: float = 1e-3,
             num_covers: int = 4000, out_dir: Path | None = None) -> Path:
    from PIL import Image
    from tqdm.auto import tqdm
    from transformers import AutoModelForImageTextToText

    from alignment.data.synthetic import generate_rows
    from alignment.models.registry import TINY_FAMILIES, load_processor
    from alignment.models.tokenizer import BOS, EOS, IMAGE

    family = TINY_FAMILIES[name]
    processor = load_processor(name)
    tokenizer = processor.tokenizer
    torch.manual_seed(0)
    config = family.tiny_config(tokenizer)
    model = AutoModelForImageTextToText.from_config(config)
    if hasattr(family, "open_cross_attention_gates"):
        family.open_cross_attention_gates(model)
    rows = generate_rows(num_covers, seed=PRETRAIN_SEED)
    images = [Image.open(io.BytesIO(r["bytes"])).convert("RGB") for r in rows["image"]]
    texts = captions(rows, random.Random(0))
    is_mllama = family.__name__.endswith("mllama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    model.train()
    start = time.time()
    bar = tqdm(range(steps), desc=f"pretrain {name}")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / steps))
        index = torch.randint(0, len(images), (batch_size,), generator=generator).tolist()
        batch = processor(
            images=[[images[i]] for i in index] if is_mllama else [images[i] for i in index],
            text=[f"{BOS}{IMAGE}{texts[i]}{EOS}" for i in index],
            return_tensors="pt", padding=True, add_special_tokens=False,
        )
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        labels[labels == tokenizer.convert_tokens_to_ids(IMAGE)] = -100
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    out_dir = out_dir or ASSETS / name
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "PRETRAINING.md").write_text(
        f"{name}: trained in full from random weights on {num_covers} synthetic cover captions "
        f"(cover seed {PRETRAIN_SEED}), {steps} steps x {batch_size}, AdamW lr {lr}, "
        f"final loss {loss.item():.4f}, {time.time() - start:.0f} s on this machine. "
        f"Reproduce: python -m alignment.models.pretrain --model {name} --steps {steps}\n"
    )
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-mllama")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    print(pretrain(args.model, args.steps, args.batch_size, args.lr, out_dir=args.out))


if __name__ == "__main__":
    main()
