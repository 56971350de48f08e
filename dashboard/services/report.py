"""A shareable, self-contained HTML report of a results.json or a sweep (`adlab report`, Compare, Benchmark).

One file, no network: plotly's JavaScript is inlined once, images are embedded as PNG data URIs. Sections for
a results file: the run's configuration and weights source, the metrics table with 95% bootstrap intervals,
ROC / PR / pixel ROC curves, the per-defect-type table, the accuracy-vs-speed Pareto chart, and heatmaps of
each method's worst misses (needs the dataset and the engine cache that made the run; says so otherwise).
A sweep adds its benchmark tables and rank chart, then the first seed's results of each dataset.

The report reuses the Compare page's computations (dashboard.services) and figures (dashboard.views), so the
file shows what the dashboard shows.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dashboard import services
from dashboard.views import images as vi
from dashboard.views import plots
from engine.api import ConfigError

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222;
padding:0 16px}
h1{font-size:26px;margin-bottom:4px}h2{font-size:20px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:16px;margin-top:20px}.muted{color:#666;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{border:1px solid #ddd;padding:4px 8px;text-align:left}
th{background:#f4f4f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:12px}.fig{min-height:200px}
.misses{display:flex;flex-wrap:wrap;gap:16px}.miss{font-size:12px;max-width:480px}
.miss img{width:150px;height:150px;image-rendering:pixelated;border:1px solid #ccc;margin-right:2px}
.bad{color:#b00020}
"""


def _esc(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _png(a: np.ndarray, size: int = 160) -> str:
    """An (H, W, 3) uint8 image as a PNG data URI, resized to at most `size` px a side."""
    from PIL import Image

    im = Image.fromarray(vi.to_rgb_uint8(a))
    if max(im.size) > size:
        im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _table(df: pd.DataFrame, digits: int = 3) -> str:
    """A frame as an HTML table: numbers right-aligned and rounded, missing values as —."""
    if df is None or df.empty:
        return '<p class="muted">Nothing to show.</p>'
    head = "".join(f"<th>{_esc(c)}</th>" for c in df.columns)
    rows = []
    for _, r in df.iterrows():
        cells = []
        for v in r.tolist():
            if v is None or (isinstance(v, float) and np.isnan(v)):
                cells.append("<td>—</td>")
            elif isinstance(v, bool | np.bool_):
                cells.append(f"<td>{'yes' if v else 'no'}</td>")
            elif isinstance(v, int | np.integer):
                cells.append(f'<td class="num">{int(v)}</td>')
            elif isinstance(v, float | np.floating):
                cells.append(f'<td class="num">{float(v):.{digits}f}</td>')
            else:
                cells.append(f"<td>{_esc(v)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


class _Figures:
    """Numbers the plotly divs of one report (ids must be unique in the page)."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, fig: Any) -> str:
        self.n += 1
        return '<div class="fig">' + fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig{self.n}",
                                                 config={"displaylogo": False, "responsive": True}) + "</div>"


def _page(title: str, body: str) -> str:
    from plotly.offline import get_plotlyjs

    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="data:,"><style>{_CSS}</style>'
            f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>'
            f'<h1>{_esc(title)}</h1><p class="muted">adlab report · made {stamp} · one self-contained file '
            f"(opens offline)</p>{body}</body></html>\n")


# ------------------------------------------------------------------------------------------- one results


def _config_section(results: dict[str, Any]) -> str:
    d = results.get("dataset", {})
    c = results.get("config", {})
    weights = sorted({str(r.get("weights")) for r in results.get("runs", []) if r.get("weights")})
    rows = [("dataset", d.get("name")), ("path", d.get("source") or d.get("path")), ("content digest", d.get("digest")),
            ("train / test images", f"{d.get('n_train')} / {d.get('n_test')}"),
            ("defect types", ", ".join(d.get("defect_types") or []) or "—"),
            ("image size", c.get("image_size")), ("backbone", c.get("backbone")), ("preset", c.get("preset")),
            ("device", c.get("device")), ("seed", c.get("seed")),
            ("labelled anomalies K", c.get("labeled_anomalies")), ("weights", "; ".join(weights) or "—"),
            ("engine version", results.get("engine_version"))]
    return _table(pd.DataFrame(rows, columns=["", "value"]).astype(str))


def _misses_section(results: dict[str, Any], worst: int) -> str:
    """Per ok method, its `worst` most confident mistakes at its F1-max threshold, each as image | mask | map."""
    if worst <= 0:
        return ""
    thr = services.thresholds(results)
    out = ['<p class="muted">At each method\'s F1-max threshold: the missed defects and false alarms furthest on '
           "the wrong side of it. Left: the image; then the ground-truth mask (green, defects only); right: the "
           "method's anomaly map (its own colour range).</p>"]
    image_cache: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for r in services.ok_runs(results):
        m = services.run_name(r)
        fps, fns = services.failures(results, m, thr.get(m))
        misses = sorted(fps + fns, key=lambda i: -i["margin"])[:worst]
        out.append(f"<h3>{_esc(m)}</h3>")
        if thr.get(m) is None:
            out.append('<p class="muted">No threshold (no F1-max threshold in its metrics).</p>')
            continue
        if not misses:
            out.append('<p class="muted">No misses at this threshold: every test image is on the right side.</p>')
            continue
        maps, note = services.method_maps(r)
        paths = [i["path"] for i in r["images"]]
        lo_hi = vi.map_range(maps) if maps is not None else None
        cards = []
        for it in misses:
            try:
                if it["path"] not in image_cache:
                    image_cache[it["path"]] = services.test_image(results, it["path"])
                img, mask = image_cache[it["path"]]
            except services.UserError as e:
                cards.append(f'<div class="miss">{_esc(it["name"])}: image not available ({_esc(e)})</div>')
                continue
            pics = [_png(img), _png(vi.overlay_mask(img, mask)) if mask is not None and it["label"] == 1 else None]
            if maps is not None and lo_hi is not None:
                pics.append(_png(vi.heat_overlay(img, maps[paths.index(it["path"])], lo_hi[0], lo_hi[1], 0.55)))
            kind = "missed defect" if it["label"] == 1 else "false alarm"
            imgs = "".join(f'<img src="{p}" alt="">' for p in pics if p)
            cards.append(f'<div class="miss">{imgs}<br><span class="bad">{kind}</span> · {_esc(it["name"])} · '
                         f"{_esc(it['defect_type'])} · score {it['score']:.4g} (threshold {thr[m]:.4g})"
                         + (f'<br><span class="muted">{_esc(note)}</span>' if note else "") + "</div>")
        out.append('<div class="misses">' + "".join(cards) + "</div>")
    return "".join(out)


def _results_body(results: dict[str, Any], fig: _Figures, worst: int, level: str = "h2") -> str:
    h = level
    parts = [f"<{h}>Configuration</{h}>", _config_section(results)]
    df = services.metrics_table(results)
    parts += [f"<{h}>Metrics</{h}>",
              '<p class="muted">AUROC 95% CI: bootstrap over the test images (500 resamples).</p>',
              _table(df.drop(columns=[c for c in ("notes",) if c in df.columns]) if not df.empty else df)]
    roc = [plots.Curve(m, x, y, a) for m, x, y, a in services.curves(results, "roc")]
    pr = [plots.Curve(m, x, y, a) for m, x, y, a in services.curves(results, "pr")]
    pix = [plots.Curve(m, x, y, a) for m, x, y, a in services.curves(results, "pixel_roc")]
    if roc:
        figs = [fig(plots.roc_figure(roc)), fig(plots.pr_figure(pr, services.base_rate(results)))]
        if pix:
            figs.append(fig(plots.roc_figure(pix, title="Pixel-level ROC", area_name="pixel AUROC")))
        parts += [f"<{h}>Curves</{h}>", '<div class="grid">' + "".join(figs) + "</div>"]
    methods, types, vals = services.per_defect(results)
    if types:
        t = pd.DataFrame(vals, columns=types)
        t.insert(0, "method", methods)
        parts += [f"<{h}>Per defect type (image AUROC against the good images)</{h}>", _table(t)]
    ms, xs, ys = services.speed_points(results)
    if ms:
        parts += [f"<{h}>Accuracy vs speed</{h}>", fig(plots.speed_accuracy_figure(ms, xs, ys))]
    if services.ok_runs(results) and worst > 0:
        parts += [f"<{h}>Worst misses</{h}>", _misses_section(results, worst)]
    return "".join(parts)


def results_report(results: dict[str, Any], *, worst: int = 3) -> str:
    """The HTML report of one results.json (as a string)."""
    name = (results.get("dataset") or {}).get("name", "results")
    return _page(f"adlab report · {name}", _results_body(results, _Figures(), worst))


# ---------------------------------------------------------------------------------------------------- sweep


def sweep_report(doc: dict[str, Any], out_dir: Path | None = None, *, worst: int = 2,
                 metric: str = "image_auroc") -> str:
    """The HTML report of a sweep: its tables and rank chart, then (when `out_dir` holds them) each dataset's
    first-seed results as in results_report."""
    from dashboard.services import benchmark as bm
    from dashboard.views import ranks as vr

    fig = _Figures()
    c = doc.get("config", {})
    ex = doc.get("executor") or {}
    units = doc.get("units", [])
    conf = pd.DataFrame([("datasets", ", ".join(d.get("name", "?") for d in doc.get("datasets", []))),
                         ("methods", ", ".join(c.get("methods", []))),
                         ("seeds", ", ".join(map(str, c.get("seeds", [])))),
                         ("preset", c.get("preset")), ("image size", c.get("image_size") or "auto"),
                         ("backbone", c.get("backbone")), ("weights", c.get("weights")),
                         ("labelled anomalies K", c.get("labeled_anomalies")),
                         ("executor", json.dumps(ex)), ("units", f"{len(units)} "
                          f"({sum(u['status'] != 'ok' for u in units)} failed)"),
                         ("engine version", doc.get("engine_version"))], columns=["", "value"]).astype(str)
    parts = ["<h2>Sweep configuration</h2>", _table(conf),
             f"<h2>{bm.METRICS[metric]}: mean ± std over seeds</h2>", _table(bm.table(doc, metric))]
    chart = bm.rank_chart_data(doc, metric)
    parts.append("<h2>Ranks</h2><p class=\"muted\">Average rank over datasets of the seed means (1 = best); bars: "
                 "range of the per-seed average ranks. Methods sharing a group letter overlap: within the "
                 "seed-to-seed noise of this sweep.</p>")
    if chart["methods"]:
        parts += [fig(vr.rank_figure(**chart)), _table(bm.ranks(doc, metric), digits=2)]
    parts += ["<h2>By family</h2>", _table(bm.family_summary(doc, metric))]
    failed = [u for u in units if u["status"] != "ok"]
    if failed:
        parts += ["<h2>Failed units</h2>", _table(pd.DataFrame(
            [{"dataset": u["dataset"], "method": u["method"], "seed": u["seed"], "error": u.get("error")}
             for u in failed]))]
    if out_dir is not None:
        first_seed = min((u["seed"] for u in units), default=None)
        for rel in dict.fromkeys(u.get("results") for u in units if u["seed"] == first_seed and u.get("results")):
            try:
                res = json.loads((out_dir / rel).read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if not res.get("runs"):
                continue
            parts += [f"<h2>{_esc(res.get('dataset', {}).get('name'))} (seed {first_seed})</h2>",
                      _results_body(res, fig, worst, level="h3")]
    return _page("adlab sweep report", "".join(parts))


def download_bytes(make: Any, *args: Any, **kwargs: Any) -> bytes:
    """`make(*args, **kwargs)` (a report function) as UTF-8 bytes for a download button; a failure becomes a small
    page that says what went wrong (the button's callable runs after the page script, where st.error cannot)."""
    try:
        return str(make(*args, **kwargs)).encode()
    except Exception as e:  # noqa: BLE001 - the user gets a message, never a stack trace
        msg = str(services._user_error(e))
        return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>adlab report</title></head>'
                f"<body><h1>The report could not be made</h1><p>{_esc(msg)}</p></body></html>\n").encode()


def write_report(source: str | Path, output: str | Path, *, worst: int = 3) -> Path:
    """Write the report of a results or sweep folder (or the JSON file itself) to `output`; returns its path.

    Raises ConfigError when `source` holds neither a results.json nor a sweep.json."""
    from engine.sweep import SWEEP_FILE, load_sweep

    src = Path(source)
    if src.is_dir():
        f = src / SWEEP_FILE if (src / SWEEP_FILE).is_file() else src / "results.json"
    else:
        f = src
    if not f.is_file():
        raise ConfigError(f"{source}: no results.json or sweep.json there (make one with `adlab run` or `adlab sweep`)")
    if f.name == SWEEP_FILE:
        text = sweep_report(load_sweep(f), f.parent, worst=min(worst, 2))
    else:
        try:
            results = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{f} is not a readable results file: {e}") from None
        if not isinstance(results, dict) or not isinstance(results.get("runs"), list):
            raise ConfigError(f"{f} is not a results file (no 'runs' list)")
        text = results_report(results, worst=worst)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out
