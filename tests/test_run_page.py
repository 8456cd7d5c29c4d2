"""alignment.run_page: report.html as a reader sees it. A recipe run writes it; headless Chromium loads
it with no console error and shows the held-out images, the answers table and the curves; absent
metrics read "—"; nothing is fetched from the network."""

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from alignment.config import ConfigError
from alignment.run_page import line_chart, rebuild_report, render_run_page
from alignment.samples import read_samples
from tests._cli_run import tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory)


# ----------------------------------------------------------------------------- a browser
def _browser_parts() -> tuple[str | None, str | None, str | None]:
    """(chromium binary, chromedriver, what is missing) on this machine."""
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
        have_selenium = True
    except ImportError:
        have_selenium = False
    missing = [name for name, ok in (("chromium", binary), ("chromedriver", driver), ("selenium", have_selenium))
               if not ok]
    return binary, driver, ", ".join(missing) or None


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through chromedriver, console messages recorded. Skipped where it is not
    installed (.ci/run installs it and sets VLM_ALIGN_REQUIRE_BROWSER=1, which turns the skip into a failure)."""
    binary, driver_path, missing = _browser_parts()
    if missing:
        message = f"headless browser test needs {missing} (apt-get install chromium chromium-driver; pip install selenium)"
        if os.environ.get("VLM_ALIGN_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    yield driver
    driver.quit()


def full_page_png(driver, page: Path) -> bytes:
    """A screenshot of the whole page (the window grown to the document's height)."""
    driver.set_window_size(1280, 900)
    driver.get(page.resolve().as_uri())
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, int(height))
    return driver.get_screenshot_as_png()


def _rgb(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png)).convert("RGB")


def _close(a, b, tolerance: int) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b))


# ----------------------------------------------------------------------------- the page of a real run
def test_a_recipe_run_writes_samples_and_the_page(run):
    report = json.loads((run / "report.json").read_text())
    for stage in report["stages"]:
        samples = read_samples(run / stage["name"])
        assert samples["split"] == "test"  # the split nothing is tuned on, when there is one
        shown = stage["test"]["samples"]  # the evaluation's own answers: no generation of its own
        assert [(r["question"], r["reference"], r["answer"]) for r in samples["examples"]] == \
            [(s["question"], s["answer"], s["prediction"]) for s in shown]
        assert all((run / stage["name"] / r["images"][0]).is_file() for r in samples["examples"])
    html = (run / "report.html").read_text()
    assert html == render_run_page(run)  # the file is the page of the run as it finished
    assert "<script" not in html and "http-equiv='Content-Security-Policy'" in html


def test_headless_chromium_shows_the_images_the_answers_and_the_curves(run, browser, tmp_path):
    png = full_page_png(browser, run / "report.html")
    problems = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert problems == []  # no console error: nothing failed to load, nothing was blocked

    sft, dpo = read_samples(run / "sft")["examples"], read_samples(run / "dpo")["examples"]
    rows = browser.find_elements("css selector", "table.examples tbody tr")
    assert len(rows) == len(sft) == len(dpo)
    for row, mine, theirs in zip(rows, sft, dpo):
        cells = [c.text for c in row.find_elements("css selector", "td")]
        assert cells[1:3] == [mine["question"], mine["reference"]]
        for cell, record in ((cells[3], mine), (cells[4], theirs)):
            assert cell.lstrip("✓✗ ") == (record["answer"].strip() or "(empty)")
    loaded = browser.execute_script(
        "return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
    assert loaded and all(loaded) and len(loaded) == len(sft)
    assert len(browser.find_elements("css selector", "svg.chart polyline")) >= 2  # each stage's loss at least

    # The pixels: each thumbnail shows its image (mean colour), and the cover's background colour is
    # on the page where the table is.
    page = _rgb(png)
    for element, record in zip(browser.find_elements("css selector", "table.examples img"), sft):
        box = element.rect
        shown = page.crop((round(box["x"]), round(box["y"]), round(box["x"] + box["width"]),
                           round(box["y"] + box["height"]))).resize((32, 32))
        source = Image.open(run / "sft" / record["images"][0]).convert("RGB").resize((32, 32))
        mean = [sum(channel) / 1024 for channel in zip(*shown.getdata())]
        expected = [sum(channel) / 1024 for channel in zip(*source.getdata())]
        assert _close(mean, expected, 12), (mean, expected)
    cover = Image.open(run / "sft" / sft[0]["images"][0]).convert("RGB")
    background = max(cover.getcolors(1 << 16))[1]
    table = browser.find_element("css selector", "table.examples").rect
    region = page.crop((round(table["x"]), round(table["y"]), round(table["x"] + table["width"]),
                        round(table["y"] + table["height"])))
    assert sum(1 for p in region.getdata() if _close(p, background, 6)) > 500
    (tmp_path / "run_page.png").write_bytes(png)


# ----------------------------------------------------------------------------- a hand-made run folder
def _hand_made_run(folder: Path) -> Path:
    folder.mkdir()
    report = {"recipe": "hand <made>", "model": "tiny-mllama", "stages": [
        {"name": "sft", "type": "sft", "steps": 3, "seconds": 1.5, "train": {"loss_first": 2.0, "loss_last": 1.0},
         "eval": {"exact_match": 0.5, "mean_answer_words": 1.0, "samples": []}, "test": None,
         "history": [{"step": 1, "loss": 2.0, "lr": 1e-3}, {"step": 2, "loss": float("nan")},
                     {"step": 3, "loss": 1.0, "lr": 5e-4}]},
        {"name": "dpo", "type": "dpo", "steps": 1, "seconds": 0.5, "train": {},
         "eval": {"preference_accuracy": None, "exact_match": 0.25}, "test": {"exact_match": 0.0},
         "history": [{"step": 1, "loss": 0.69, "rewards/chosen": 0.1, "rewards/rejected": -0.1}]}]}
    (folder / "report.json").write_text(json.dumps(report))
    (folder / "recipe.yaml").write_text("name: hand\nstages:\n- name: sft\n  type: sft\n- name: dpo\n  type: dpo\n")
    (folder / "sft" / "samples").mkdir(parents=True)
    Image.new("RGB", (20, 30), (10, 200, 30)).save(folder / "sft" / "samples" / "g.png")
    (folder / "sft" / "samples.json").write_text(json.dumps({"stage": "sft", "type": "sft", "split": "val", "examples": [
        {"id": "x", "image_id": "x", "images": ["samples/g.png"], "question": "Is it <b>green</b>?",
         "reference": "Yes", "answer": "yes."}]}))
    (folder / "dpo").mkdir()
    (folder / "dpo" / "samples.json").write_text(json.dumps({"stage": "dpo", "type": "dpo", "split": "val", "examples": [
        {"id": "y", "image_id": "y", "images": [], "question": "Another question?", "reference": "No",
         "answer": " "}]}))
    return folder


def test_absent_metrics_read_as_a_dash_never_zero(tmp_path):
    html = render_run_page(_hand_made_run(tmp_path / "run"))
    dpo_card = html.split("<h3>dpo")[1].split("</div>")[0]
    # preference_accuracy is None on val: a dash, and no row invents a number for it
    assert "preference_accuracy</th><td class='absent'>—</td><td class='absent'>—</td>" in dpo_card
    assert "exact_match</th><td class='num'>0.25</td><td class='num'>0</td>" in dpo_card  # a real 0 stays
    sft_card = html.split("<h3>sft")[1].split("</div>")[0]
    assert "exact_match</th><td class='num'>0.5</td><td class='absent'>—</td>" in sft_card  # no test split


def test_text_is_escaped_and_images_are_embedded(tmp_path):
    html = render_run_page(_hand_made_run(tmp_path / "run"))
    assert "Is it &lt;b&gt;green&lt;/b&gt;?" in html and "hand &lt;made&gt;" in html
    sources = [part.split("'", 1)[0] for part in html.split("src='")[1:]]
    assert len(sources) == 1 and sources[0].startswith("data:image/png;base64,")
    assert "class='answer hit'" in html  # "yes." matches "Yes" after normalisation
    examples = html.split("class='examples'")[1].split("</table>")[0]
    rows = examples.split("<tbody>")[1].split("</tr>")[:-1]
    assert len(rows) == 2  # matched by (image, question): each stage answered a different one
    assert rows[0].endswith("<td class='absent'>—</td>") and "<td class='absent'>—</td><td class='answer miss'>" in rows[1]
    assert rows[1].endswith("<em class='empty'>(empty)</em></td>")  # an empty answer is said, not a blank cell
    assert "■ chosen" in html and "■ rejected" in html  # one rewards chart, the shared prefix dropped


def test_a_chart_leaves_out_non_finite_points():
    svg = line_chart("loss", [("loss", [1, 2, 3], [2.0, float("nan"), 1.0])])
    (points,) = [part.split("'")[0] for part in svg.split("points='")[1:]]
    assert len(points.split()) == 2 and "nan" not in svg.lower()
    assert line_chart("empty", [("x", [1], [float("inf")])]) == ""


def test_rebuild_report_rewrites_the_page_and_refuses_a_folder_without_a_run(tmp_path):
    run = _hand_made_run(tmp_path / "run")
    assert rebuild_report(run) == run / "report.html" and (run / "report.html").read_text() == render_run_page(run)
    with pytest.raises(ConfigError, match="has no report.json"):
        rebuild_report(tmp_path)
