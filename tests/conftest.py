"""Shared test setup: a private model cache, few threads, fixed seeds."""

import os
import tempfile

os.environ.setdefault("VLM_ALIGN_CACHE", os.path.join(tempfile.gettempdir(), "vlm-align-test-cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for a module (use with `pytest.mark.usefixtures`): exact
    comparisons need equal thread counts, and on a shared 2-core machine two spinning OpenMP threads
    run several times slower while the tiny models lose little."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompts():
    """The online stages' prompts (PPO, GRPO): (train, eval) SFT examples of 60 synthetic covers."""
    from alignment.data import build_datasets

    train, evaluation, _ = build_datasets(num_covers=60, seed=0, task="sft", max_eval_samples=4)
    return train, evaluation


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """An "SFT" policy adapter and a "reward" adapter + head on tiny-mllama, perturbed so neither is a no-op."""
    from tests._adapters import save_perturbed_adapters

    return save_perturbed_adapters(tmp_path_factory.mktemp("adapters"))
