"""The run page: `<output_dir>/report.html`, one self-contained file a person opens in a browser.

    html = render_run_page("outputs/dpo_bookcover")   # the run folder in, the page out (reads files only)
    write_run_page("outputs/dpo_bookcover")            # -> outputs/dpo_bookcover/report.html
    rebuild_report("outputs/dpo_bookcover")            # the same, for `vlm-align report RUN_DIR`

What it shows, from the files a run writes: each stage's metrics on val and test (report.json; a
value a split does not have shows "—", never 0.0), a table of held-out examples with each stage's
answer side by side (`<stage>/samples.json`, see `alignment.samples`), each stage's training curves
(the logged scalars of report.json's `history`, drawn as inline SVG) and the resolved recipe.

Self-contained: no script, no font or stylesheet from the network; images are embedded as data:
URIs and a Content-Security-Policy forbids loading anything else.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path

from alignment.report import PANELS
from alignment.samples import read_samples
from alignment.summary import ABSENT, metric_keys, scalar_metrics

PAGE_FILE = "report.html"
THUMBNAIL_SIDE = 160  # px: the longer side of an image embedded in the examples table
NOT_CURVES = ("step", "skipped", "skipped_empty")  # history keys that are counters, not curves
COLOURS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2")

CSS = """
:root { color-scheme: light; --ink: #1f2933; --muted: #616e7c; --line: #d9dee5; --soft: #f5f7fa; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--ink); background: #fff; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 28px 48px; }
header h1 { margin: 0 0 4px; font-size: 26px; }
header p { margin: 2px 0; color: var(--muted); }
nav { margin: 14px 0 8px; display: flex; gap: 16px; font-size: 14px; }
nav a { color: #2563eb; text-decoration: none; }
h2 { margin: 32px 0 10px; font-size: 20px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { margin: 18px 0 8px; font-size: 16px; }
.note { color: var(--muted); font-size: 13px; margin: 4px 0 10px; }
table { border-collapse: collapse; font-size: 14px; }
th, td { border: 1px solid var(--line); padding: 6px 9px; text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.absent { color: #9aa5b1; text-align: center; }
.cards { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; background: #fff; }
.card h3 { margin-top: 0; }
.card p { margin: 0 0 8px; color: var(--muted); font-size: 13px; }
details { margin-top: 8px; font-size: 13px; }
summary { cursor: pointer; color: var(--muted); }
table.examples { width: 100%; }
table.examples td.image { width: 1%; }
table.examples img { display: block; width: 128px; height: auto; border-radius: 4px; border: 1px solid var(--line); }
td.answer.hit { background: #ecfdf3; }
td.answer.miss { background: #fef3f2; }
.mark { font-weight: 700; margin-right: 4px; }
.hit .mark { color: #15803d; }
.miss .mark { color: #b42318; }
em.empty { color: var(--muted); }
.reward { display: block; color: var(--muted); font-size: 12px; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
svg.chart { border: 1px solid var(--line); border-radius: 6px; background: #fff; }
svg.chart text { font: 11px system-ui, -apple-system, "DejaVu Sans", sans-serif; fill: var(--muted); }
svg.chart text.title { font-size: 12px; font-weight: 600; fill: var(--ink); }
pre { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: 12px;
      overflow: auto; max-height: 420px; font-size: 13px; }
"""


def _e(text) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


# ----------------------------------------------------------------------------- reading the run
def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _stage_order(run_dir: Path, report: dict) -> list[dict]:
    """The report's stage entries in the recipe's order when recipe.yaml is there (a resume may have
    appended them out of order), else as written."""
    entries = list(report.get("stages", []))
    recipe = _recipe_dict(run_dir)
    if recipe:
        order = {s.get("name"): i for i, s in enumerate(recipe.get("stages", []))}
        entries.sort(key=lambda e: order.get(e.get("name"), len(order)))
    return entries


def _recipe_text(run_dir: Path) -> str | None:
    path = run_dir / "recipe.yaml"
    return path.read_text() if path.is_file() else None


def _recipe_dict(run_dir: Path) -> dict | None:
    import yaml

    text = _recipe_text(run_dir)
    try:
        loaded = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return None
    return loaded if isinstance(loaded, dict) else None


def _data_uri(path: Path) -> str | None:
    """A PNG thumbnail (longer side THUMBNAIL_SIDE px) of the image file as a data: URI; None if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            thumb = image.convert("RGB")
    except OSError:
        return None
    thumb.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------- metrics
def _metric_rows(keys: list[str], val: dict, test: dict) -> str:
    cells = []
    for key in keys:
        row = [f"<th scope='row'>{_e(key)}</th>"]
        for block in (val, test):
            row.append(f"<td class='num'>{_e(_fmt(block[key]))}</td>" if key in block
                       else f"<td class='absent'>{ABSENT}</td>")
        cells.append("<tr>" + "".join(row) + "</tr>")
    return "".join(cells)


def _stage_card(entry: dict) -> str:
    """One stage's card: steps, time, first and last loss, and its metrics on val and test."""
    val, test = scalar_metrics(entry.get("eval")), scalar_metrics(entry.get("test"))
    keys = metric_keys(entry.get("eval"), entry.get("test"))
    main, breakdown = [k for k in keys if "/" not in k], [k for k in keys if "/" in k]
    train = entry.get("train") or {}
    facts = [f"{entry.get('steps', '?')} steps", f"{_fmt(entry['seconds'])} s" if entry.get("seconds") is not None else ""]
    if train.get("loss_first") is not None and train.get("loss_last") is not None:
        facts.append(f"training loss {_fmt(train['loss_first'])} → {_fmt(train['loss_last'])}")
    if train.get("skipped_nonfinite_steps"):
        facts.append(f"{train['skipped_nonfinite_steps']} steps skipped (non-finite)")
    head = "<tr><th>metric</th><th>val</th><th>test</th></tr>"
    parts = [f"<div class='card'><h3>{_e(entry.get('name'))} <small>({_e(entry.get('type'))})</small></h3>",
             f"<p>{_e(' · '.join(f for f in facts if f))}</p>"]
    if main:
        parts.append(f"<table class='metrics'>{head}{_metric_rows(main, val, test)}</table>")
    else:
        parts.append("<p>no metrics (no held-out examples)</p>")
    if breakdown:
        parts.append(f"<details><summary>{len(breakdown)} more (per kind)</summary>"
                     f"<table class='metrics'>{head}{_metric_rows(breakdown, val, test)}</table></details>")
    return "".join(parts) + "</div>"


# ----------------------------------------------------------------------------- held-out examples
def _example_key(record: dict) -> tuple:
    return (record.get("image_id") or "|".join(record.get("images", [])), record.get("question"))


def _examples_table(run_dir: Path, entries: list[dict]) -> str:
    """Rows: a held-out example (image, question, reference); columns: each stage's answer. Examples
    are matched across stages by (image id, question)."""
    from alignment.evaluate import normalize_answer

    columns, rows = [], {}
    for entry in entries:
        samples = read_samples(run_dir / entry["name"])
        if not samples or not samples.get("examples"):
            continue
        columns.append((entry, samples["split"], {}))
        for record in samples["examples"]:
            key = _example_key(record)
            if key not in rows:
                rows[key] = {"record": record, "stage_dir": run_dir / entry["name"]}
            columns[-1][2][key] = record
    if not columns:
        return "<p class='note'>No stage kept held-out answers (samples.json).</p>"
    splits = sorted({split for _, split, _ in columns})
    head = ["<th>image</th><th>question</th><th>reference</th>"]
    head += [f"<th>{_e(entry['name'])} <small>({_e(entry.get('type'))})</small></th>" for entry, _, _ in columns]
    body = []
    for key, row in rows.items():
        record, stage_dir = row["record"], row["stage_dir"]
        images = []
        for relative in record.get("images", []):
            path = (stage_dir / relative).resolve()
            uri = _data_uri(path) if path.is_relative_to(stage_dir.resolve()) and path.is_file() else None
            if uri:
                images.append(f"<img src='{uri}' alt='{_e(record.get('image_id') or 'held-out image')}'>")
        cells = [f"<td class='image'>{''.join(images) or ABSENT}</td>", f"<td>{_e(record.get('question'))}</td>",
                 f"<td>{_e(record.get('reference'))}</td>"]
        reference = normalize_answer(record.get("reference") or "")
        for _, _, answers in columns:
            answer = answers.get(key)
            if answer is None:
                cells.append(f"<td class='absent'>{ABSENT}</td>")
                continue
            hit = normalize_answer(answer.get("answer") or "") == reference
            reward = (f"<span class='reward'>reward {_e(_fmt(answer['reward']))}</span>"
                      if isinstance(answer.get("reward"), (int, float)) else "")
            text = _e(answer.get("answer")) if (answer.get("answer") or "").strip() else "<em class='empty'>(empty)</em>"
            cells.append(f"<td class='answer {'hit' if hit else 'miss'}'><span class='mark'>{'✓' if hit else '✗'}"
                         f"</span>{text}{reward}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    note = (f"The first held-out examples of the {' and '.join(splits)} split, each stage's greedy answer "
            "(✓ when it matches the reference after normalisation: case, punctuation, articles).")
    return (f"<p class='note'>{_e(note)}</p><table class='examples'><thead><tr>{''.join(head)}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


# ----------------------------------------------------------------------------- curves
def _tick(value: float) -> str:
    """An axis label of at most about 8 characters."""
    return f"{value:.2e}" if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5) else f"{value:.3g}"


def _legend_labels(labels: list[str]) -> list[str]:
    """Series labels without the prefix they share ("rewards/chosen", "rewards/rejected" -> "chosen", ...)."""
    prefix = os.path.commonprefix(labels) if len(labels) > 1 else ""
    prefix = prefix[: prefix.rfind("/") + 1]
    return [label[len(prefix):] or label for label in labels]


def line_chart(title: str, series: list[tuple[str, list[float], list[float]]], width: int = 320,
               height: int = 180) -> str:
    """An inline SVG line chart: `series` is [(label, steps, values)], drawn against the step on one
    shared scale; non-finite values are left out. The y axis shows min, middle and max."""
    points = [[(x, y) for x, y in zip(xs, ys) if isinstance(y, (int, float)) and math.isfinite(y)]
              for _, xs, ys in series]
    every = [p for line in points for p in line]
    if not every:
        return ""
    left, right, top, bottom = 62, 12, 26 + 14 * (len(series) > 1), 26
    x0, x1 = min(p[0] for p in every), max(p[0] for p in every)
    y0, y1 = min(p[1] for p in every), max(p[1] for p in every)
    if x0 == x1:
        x0, x1 = x0 - 1, x1 + 1
    if y0 == y1:
        pad = abs(y0) * 0.05 or 1.0
        y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    parts = [f"<svg class='chart' xmlns='http://www.w3.org/2000/svg' role='img' width='{width}' height='{height}' "
             f"viewBox='0 0 {width} {height}'><title>{_e(title)}</title>",
             f"<text class='title' x='10' y='16'>{_e(title)}</text>"]
    for value in (y0, (y0 + y1) / 2, y1):
        y = sy(value)
        parts.append(f"<line x1='{left}' x2='{width - right}' y1='{y:.1f}' y2='{y:.1f}' stroke='#e4e7eb'/>"
                     f"<text x='{left - 5}' y='{y + 4:.1f}' text-anchor='end'>{_e(_tick(value))}</text>")
    for value, anchor in ((x0, "start"), (x1, "end")):
        parts.append(f"<text x='{sx(value):.1f}' y='{height - 8}' text-anchor='{anchor}'>{_e(f'{value:g}')}</text>")
    parts.append(f"<text x='{(left + width - right) / 2:.1f}' y='{height - 8}' text-anchor='middle'>step</text>")
    legend_x = 10
    for index, (label, line) in enumerate(zip(_legend_labels([s[0] for s in series]), points)):
        colour = COLOURS[index % len(COLOURS)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in line)
        if len(line) > 1:
            parts.append(f"<polyline fill='none' stroke='{colour}' stroke-width='1.8' points='{coords}'/>")
        for x, y in line if len(line) <= 30 else []:
            parts.append(f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='2.2' fill='{colour}'/>")
        if len(series) > 1:
            parts.append(f"<text x='{legend_x}' y='32' style='fill:{colour}'>■ {_e(label)}</text>")
            legend_x += 22 + 6 * len(label)
    return "".join(parts) + "</svg>"


def _stage_charts(entry: dict) -> str:
    """The stage's logged scalars: the report's panels (loss; rewards; accuracy; KL and score) first,
    then one chart per other scalar (grad_norm, lr, ...)."""
    history = entry.get("history") or []
    keys = list(dict.fromkeys(k for h in history for k, v in h.items()
                              if k not in NOT_CURVES and isinstance(v, (int, float)) and not isinstance(v, bool)))
    charts, used = [], set()

    def series(key: str) -> tuple[str, list, list]:
        rows = [h for h in history if isinstance(h.get(key), (int, float))]
        return key, [h["step"] for h in rows], [h[key] for h in rows]

    for title, panel_keys in PANELS:
        present = [k for k in panel_keys if k in keys]
        if present:
            charts.append(line_chart(title, [series(k) for k in present]))
            used.update(present)
    charts += [line_chart(key, [series(key)]) for key in keys if key not in used]
    charts = [c for c in charts if c]
    if not charts:
        return ""
    return (f"<h3>{_e(entry.get('name'))} <small>({_e(entry.get('type'))})</small></h3>"
            f"<div class='charts'>{''.join(charts)}</div>")


# ----------------------------------------------------------------------------- the page
def render_run_page(run_dir: str | os.PathLike) -> str:
    """The run page of the run in `run_dir` as one HTML string (reads report.json, recipe.yaml and
    each stage's samples.json and images; writes nothing)."""
    run_dir = Path(run_dir)
    report = _read_json(run_dir / "report.json")
    entries = _stage_order(run_dir, report)
    recipe = _recipe_dict(run_dir) or {}
    planned = [s.get("name") for s in recipe.get("stages", [])] or [e.get("name") for e in entries]
    chain = " → ".join(f"{e.get('name')} ({e.get('type')})" for e in entries)
    seconds = sum(e.get("seconds") or 0 for e in entries)
    name = report.get("recipe") or run_dir.name
    facts = [f"model {report.get('model', '?')}", f"stages {chain or 'none yet'}",
             f"{len(entries)} of {len(planned)} finished in {seconds:.0f} s"]
    curves = "".join(_stage_charts(e) for e in entries) or "<p class='note'>No training steps logged.</p>"
    recipe_text = _recipe_text(run_dir)
    sections = [
        "<section id='metrics'><h2>Metrics</h2><p class='note'>After each stage, on the val split (what "
        "recipes are tuned on) and the test split (never used for tuning); — where a split has no value.</p>"
        f"<div class='cards'>{''.join(_stage_card(e) for e in entries)}</div></section>",
        f"<section id='examples'><h2>Held-out examples</h2>{_examples_table(run_dir, entries)}</section>",
        f"<section id='curves'><h2>Training curves</h2>{curves}</section>",
        "<section id='recipe'><h2>Recipe</h2>"
        + (f"<pre>{_e(recipe_text)}</pre>" if recipe_text else "<p class='note'>no recipe.yaml in this run</p>")
        + "</section>",
    ]
    return "".join([
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{_e(name)} · vlm-align run</title><style>{CSS}</style></head><body><main>",
        f"<header><h1>{_e(name)}</h1>", "".join(f"<p>{_e(f)}</p>" for f in facts),
        f"<p>{_e(str(run_dir))}</p></header>",
        "<nav><a href='#metrics'>Metrics</a><a href='#examples'>Held-out examples</a>"
        "<a href='#curves'>Training curves</a><a href='#recipe'>Recipe</a></nav>",
        *sections, "</main></body></html>\n"])


def write_run_page(run_dir: str | os.PathLike) -> Path:
    """`run_dir/report.html` from the run's files, written atomically; returns its path."""
    run_dir = Path(run_dir)
    path = run_dir / PAGE_FILE
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render_run_page(run_dir), encoding="utf-8")
    os.replace(tmp, path)
    return path


def rebuild_report(run_dir: str | os.PathLike) -> Path:
    """`vlm-align report RUN_DIR`: rewrite the run page of a finished (or partly finished) run; one
    ConfigError line when `run_dir` holds no run."""
    from alignment.errors import ConfigError

    run_dir = Path(run_dir)
    if not (run_dir / "report.json").is_file():
        raise ConfigError(f"{run_dir} has no report.json; give the output_dir of a `vlm-align train` run "
                          "(it is written when the first stage finishes)")
    return write_run_page(run_dir)


def command(args) -> int:
    """`vlm-align report RUN_DIR` (arguments from `alignment.cli`'s parser)."""
    print(f"wrote {rebuild_report(args.run_dir)}")
    return 0
