"""vlm-align: post-training alignment for vision-language models."""

__version__ = "0.1.0"

MIN_TORCH = (2, 6)  # torch.load defaults to weights_only from 2.6 on (CVE-2025-32434)


def check_torch_version(version: str) -> None:
    """Refuse torch older than `MIN_TORCH` (read from package metadata: no torch import here)."""
    parts = version.split("+")[0].split(".")
    try:
        found = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        return  # a local build with an unusual version string: let it through
    if found < MIN_TORCH:
        raise ImportError(
            f"vlm-align needs torch >= {'.'.join(map(str, MIN_TORCH))} (safe torch.load, CVE-2025-32434); "
            f"found torch {version}. Upgrade torch, e.g. pip install 'torch>=2.6'"
        )


def _installed_torch() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return None


if (_torch_version := _installed_torch()) is not None:
    check_torch_version(_torch_version)
