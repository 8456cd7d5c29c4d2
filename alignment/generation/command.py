"""`vlm-align generate RUN_DIR/STAGE --image F --question Q`: one greedy answer of a policy stage, with the
book-cover prompt format and the run's instruction; with `--adapters a,b`, one answer per adapter on one base."""

from __future__ import annotations

from pathlib import Path

import torch

from alignment.errors import ConfigError
from alignment.runs import adapter_folders, instruction_of, load_adapters, load_base, open_stage


def read_image(path: str):
    """The image file at `path` as an RGB PIL image; a file that is not one is a one-line user error."""
    from alignment.data.errors import DataValidationError
    from alignment.data.images import ImageProblem, open_image, to_rgb

    file = Path(path).expanduser().resolve()
    try:
        return to_rgb(open_image(file, file.parent))[0]
    except ImageProblem as problem:
        raise DataValidationError(f"--image: {problem.problem}") from None


def generate_answer(policy, image, question: str, instruction: str, max_new_tokens: int) -> str:
    """One greedy answer of the policy's active adapter, with the book-cover prompt format."""
    from alignment.data import collate_prompts

    example = {"id": "cli", "image_id": "cli", "image": image, "question": question, "answer": "", "kind": "other"}
    batch = collate_prompts([example], policy.processor, instruction=instruction)
    batch = {k: v.to(policy.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    tokens = policy.generate(batch, max_new_tokens=max_new_tokens, temperature=0.0)
    return policy.decode(tokens)[0]


def command(args) -> int:
    """`vlm-align generate` (arguments from `alignment.cli`'s parser)."""
    recipe, index, _ = open_stage(args.stage, args.recipe)
    config = recipe.stages[index]
    if config.type == "reward":
        raise ConfigError(f"stage {config.name!r} is a reward model; generate with a policy stage (sft, dpo, ppo, grpo)")
    if args.max_new_tokens is not None and args.max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    folders = adapter_folders(args.adapters) if args.adapters else None
    image = read_image(args.image)
    policy = load_base(recipe)
    budget = args.max_new_tokens or config.max_new_tokens
    if folders:  # several adapters on one base: one answer each, in turn
        load_adapters(policy, folders)
        for name in folders:
            policy.set_adapter(name)
            print(f"{name}: {generate_answer(policy, image, args.question, instruction_of(recipe), budget)}")
        return 0
    policy.load_adapter("policy", Path(args.stage), trainable=False)
    policy.eval()
    print(generate_answer(policy, image, args.question, instruction_of(recipe), budget))
    return 0
