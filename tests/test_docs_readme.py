"""README.md as a front door: short, the set-up, run and test commands on the first screen, every
shipped recipe listed, the bad-input table in its place, and headline figures that come from
docs/results.md (where every measured table lives, dated, with its command).

Plain text checks on files of the repository: no model, no import of the package.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
LINES = README.splitlines()


def section(title: str) -> str:
    """The text of README's `## title` section, up to the next `## ` heading."""
    start = LINES.index(f"## {title}")
    end = next((i for i in range(start + 1, len(LINES)) if LINES[i].startswith("## ")), len(LINES))
    return "\n".join(LINES[start + 1:end])


def test_readme_is_under_200_lines():
    assert len(LINES) < 200, f"README.md has {len(LINES)} lines; move detail to docs/"


def test_setup_run_and_test_commands_are_in_the_first_30_lines():
    first_screen = "\n".join(LINES[:30])
    assert "bash launch/setup.sh" in first_screen
    assert re.search(r"accelerate launch .*launch/run\.py recipes/\w+\.yaml", first_screen)
    # .ci/run runs exactly this line: the README's test command is CI's.
    assert "    bash tests/run.sh" in LINES[:30]
    assert "bash tests/run.sh" in (ROOT / ".ci" / "run").read_text()


def test_recipe_table_lists_every_shipped_recipe_and_only_those():
    listed = set(re.findall(r"^\| `(recipes/[\w.]+\.yaml)` \|", section("Recipes"), flags=re.M))
    shipped = {f"recipes/{p.name}" for p in (ROOT / "recipes").glob("*.yaml")}
    assert listed == shipped, f"missing: {sorted(shipped - listed)}; not shipped: {sorted(listed - shipped)}"


def test_every_recipe_path_named_in_readme_exists():
    named = set(re.findall(r"recipes/\w+\.yaml", README))
    assert named and all((ROOT / path).is_file() for path in named), sorted(p for p in named if not (ROOT / p).is_file())


def test_bad_input_table_keeps_its_heading_header_and_rows():
    table = section("Bad inputs: what the user sees")
    assert "| input | what the user sees |\n| --- | --- |" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and line not in
            ("| input | what the user sees |", "| --- | --- |")]
    assert len(rows) >= 21, f"{len(rows)} rows"
    assert all(line.count(" | ") >= 1 and line.endswith(" |") for line in rows)


def test_readme_shows_the_run_page_and_links_the_architecture_page():
    assert "![The run page](docs/images/run_page.png)" in README
    assert "[docs/architecture.md](docs/architecture.md)" in README


def test_headline_figures_come_from_docs_results():
    results = (ROOT / "docs" / "results.md").read_text()
    headline = section("Results")
    figures = re.findall(r"\d+\.\d+", headline)
    assert len(figures) >= 15
    assert [f for f in figures if f not in results] == []
    # Each headline table names its date and the command that reproduces it.
    assert "python bench/recipe_seeds.py" in headline and "2026-" in headline


def test_readme_uses_no_project_internal_words():
    internal = re.findall(r"seed 00\d|issue #?\d+|this project's|\(#\d+\)", README, flags=re.I)
    assert internal == []
