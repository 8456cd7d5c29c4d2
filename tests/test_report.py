"""alignment.report: the model card's usage example runs as written (its cover image is shipped)."""

import shlex
from pathlib import Path

import pytest

from alignment.cli import main
from tests._cli_run import tiny_run

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


def test_the_cards_generate_example_runs_as_written(tmp_path_factory, monkeypatch, capsys):
    run = tiny_run(tmp_path_factory)
    card = (run / "README.md").read_text()
    (line,) = [line for line in card.splitlines() if line.startswith("vlm-align generate ")]
    monkeypatch.chdir(ROOT)  # "from the root of a vlm-align clone", as the card says
    capsys.readouterr()
    assert main(shlex.split(line)[1:]) == 0
    assert capsys.readouterr().out.strip()  # an answer
