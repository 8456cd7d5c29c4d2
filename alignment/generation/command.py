"""`vlm-align generate RUN_DIR/STAGE --image F --question Q`: answers of a policy stage in the book-cover prompt
format with the run's instruction, greedy by default or sampled (`--temperature`, `--top-p`, `--num-samples`,
`--seed`); with `--adapters a,b`, answers from each adapter on one base in turn."""

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


def generate_answers(policy, image, question: str, instruction: str, max_new_tokens: int, temperature: float = 0.0,
                     top_p: float = 1.0, num_samples: int = 1, seed: int = 0) -> list[str]:
    """`num_samples` answers of the policy's active adapter to `question` about `image`, in the book-cover prompt
    format: greedy at temperature 0, else sampled (the prompt prefilled once for all samples)."""
    from alignment.data import collate_prompts

    example = {"id": "cli", "image_id": "cli", "image": image, "question": question, "answer": "", "kind": "other"}
    batch = collate_prompts([example], policy.processor, instruction=instruction)
    batch = {k: v.to(policy.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    generator = torch.Generator(device=policy.device).manual_seed(seed) if temperature > 0 else None
    tokens = policy.generate(batch, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             num_samples=num_samples, generator=generator)
    return policy.decode(tokens)


def generate_answer(policy, image, question: str, instruction: str, max_new_tokens: int) -> str:
    """One greedy answer of the policy's active adapter, with the book-cover prompt format."""
    return generate_answers(policy, image, question, instruction, max_new_tokens)[0]


def _check_sampling(args) -> None:
    if args.max_new_tokens is not None and args.max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.num_samples > 1 and args.temperature == 0:
        raise ConfigError(f"--num-samples {args.num_samples} with --temperature 0 gives one greedy answer "
                          f"{args.num_samples} times; set --temperature (e.g. 0.7)")


def command(args) -> int:
    """`vlm-align generate` (arguments from `alignment.cli`'s parser)."""
    recipe, index, _ = open_stage(args.stage, args.recipe)
    config = recipe.stages[index]
    if config.type == "reward":
        raise ConfigError(f"stage {config.name!r} is a reward model; generate with a policy stage (sft, dpo, ppo, grpo)")
    _check_sampling(args)
    folders = adapter_folders(args.adapters) if args.adapters else None
    image = read_image(args.image)
    policy = load_base(recipe)
    sampling = {"max_new_tokens": args.max_new_tokens or config.max_new_tokens, "temperature": args.temperature,
                "top_p": args.top_p, "num_samples": args.num_samples, "seed": args.seed}
    if folders:  # several adapters on one base: answers from each, in turn
        load_adapters(policy, folders)
        for name in folders:
            policy.set_adapter(name)
            for answer in generate_answers(policy, image, args.question, instruction_of(recipe), **sampling):
                print(f"{name}: {answer}")
        return 0
    policy.load_adapter("policy", Path(args.stage), trainable=False)
    policy.eval()
    for answer in generate_answers(policy, image, args.question, instruction_of(recipe), **sampling):
        print(answer)
    return 0
