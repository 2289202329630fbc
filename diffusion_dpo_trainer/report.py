"""`report.html` of an evaluation: the results table and base/tuned images side by side, in one file that opens
offline in any browser (images are embedded as PNG data URIs, downscaled to `THUMBNAIL` pixels)."""

import base64
import html
import io
from pathlib import Path

from PIL import Image

THUMBNAIL = 256
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th { background: #f3f3f3; } td.name { text-align: left; }
.ci { color: #777; font-size: 85%; } .better { color: #0a7c2f; font-weight: 600; } .worse { color: #b3261e; }
.pair { display: inline-block; margin: 0 1em 1.5em 0; vertical-align: top; max-width: 540px; }
.pair img { width: 256px; height: 256px; object-fit: contain; background: #eee; }
.pair p { margin: 0.3em 0; font-size: 90%; }
code { background: #f6f6f6; padding: 1px 4px; }
"""


def _data_uri(path: Path) -> str:
    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _interval(stat: dict, digits: int) -> str:
    low, high = stat["ci95"]
    value = stat.get("mean", stat.get("value"))
    return f"{value:.{digits}f} <span class=ci>[{low:.{digits}f}, {high:.{digits}f}]</span>"


def _table(report: dict) -> str:
    rows = [("<tr><th>prompt set</th><th>reward</th><th>prompts</th><th>base (95% CI)</th><th>tuned (95% CI)</th>"
            "<th>tuned win rate (95% CI)</th></tr>")]
    for set_name, rewards in report["results"].items():
        for reward, entry in rewards.items():
            cells = [f"<td class=name>{html.escape(set_name)}</td>", f"<td class=name>{html.escape(reward)}</td>",
                     f"<td>{entry['num_prompts']}</td>", f"<td>{_interval(entry['base'], 4)}</td>"]
            cells.append(f"<td>{_interval(entry['tuned'], 4)}</td>" if "tuned" in entry else "<td>-</td>")
            if "win_rate" in entry:
                low, high = entry["win_rate"]["ci95"]
                verdict = "better" if low > 0.5 else "worse" if high < 0.5 else ""
                cells.append(f"<td class='{verdict}'>{_interval(entry['win_rate'], 3)}</td>")
            else:
                cells.append("<td>-</td>")
            rows.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>" + "\n".join(rows) + "</table>"


def write_html(path: Path, report: dict, samples: dict) -> None:
    """`samples`: {set name: [(prompt index, prompt, {variant: image path})]} shown side by side."""
    settings = report["settings"]
    parts = [(f"<!doctype html><html><head><meta charset='utf-8'><title>Evaluation report</title><style>{STYLE}"
             "</style></head><body><h1>Evaluation report</h1>"),
             f"<p>Model <code>{html.escape(str(settings['model']))}</code>"
             + "".join(f", {k} <code>{html.escape(str(settings[k]))}</code>" for k in ("lora", "denoiser", "reference")
                       if settings.get(k))
             + f". Sampling <code>{html.escape(str(settings['sampling']))}</code>, seeds "
             f"<code>{settings['seeds']}</code>. Intervals: bootstrap over prompts; a win rate is green when its "
             "interval lies above 0.5, red when below.</p>",
             _table(report)]
    for set_name, items in samples.items():
        parts.append(f"<h2>{html.escape(set_name)}</h2><div>")
        for index, prompt, images in items:
            shown = [(variant, image) for variant, image in sorted(images.items()) if Path(image).is_file()]
            parts.append("<div class=pair>" + "".join(
                f"<img src='{_data_uri(Path(image))}' alt='{variant}' title='{variant}'>" for variant, image in shown)
                + f"<p>#{index} ({' | '.join(v for v, _ in shown)}): {html.escape(prompt)}</p></div>")
        parts.append("</div>")
    parts.append(f"<p class=ci>versions: {html.escape(str(settings.get('versions', {})))}</p></body></html>")
    Path(path).write_text("\n".join(parts), encoding="utf-8")
