"""The eval command's results: means per method and reference count, ``results.md`` in the layouts of SynCD Table 1
and JeDi Table 2, ``results.json``, and one image grid per subject."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Optional, Sequence

from ..core.metrics import geometric_score
from .scoring import KEYS, METRICS

TABLE1 = ("MDINOv2-I (background)", "MDINOv2-I (property)", "CLIP-T", "TIFA", "GeometricScore")
TABLE1_HEADERS = ("MDINOv2-I background change", "MDINOv2-I property change", "CLIPScore", "TIFA", "GeometricScore")
TABLE2 = ("CLIP-T", "CLIP-I", "MCLIP-I", "DINO", "MDINO")
THUMB = 128


def _mean(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def aggregate(records: Sequence[dict]) -> dict:
    """{method: {references: {metric: mean or None, ..., "images": n, "not_detected": n}}}. MDINOv2-I is also split
    by prompt kind (SynCD Table 1); GeometricScore is √(mean TIFA · mean MDINOv2-I) (SynCD Table 1's numbers)."""
    groups: dict = {}
    for record in records:
        groups.setdefault(record["method"], {}).setdefault(record["references"], []).append(record)
    result: dict = {}
    for method, by_count in groups.items():
        for count, rows in sorted(by_count.items()):
            means = {metric: _mean([r.get(key) for r in rows]) for metric, key in KEYS.items()}
            for kind in ("background", "property"):
                means[f"MDINOv2-I ({kind})"] = _mean([r.get("mdinov2_i") for r in rows if r["kind"] == kind])
            tifa, mdino = means["TIFA"], means["MDINOv2-I"]
            means["GeometricScore"] = None if tifa is None or mdino is None else geometric_score(tifa, mdino)
            means["images"] = len(rows)
            if any("detected" in r for r in rows):
                means["not_detected"] = sum(1 for r in rows if r.get("detected") is False)
            result.setdefault(method, {})[str(count)] = means
    return result


def _cell(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown(summary: dict, skipped: dict, notes: Sequence[str] = ()) -> str:
    """``results.md``: the SynCD Table 1 and JeDi Table 2 layouts, then the skipped metrics and notes."""
    lines = ["# Evaluation results", "", "## SynCD Table 1 layout", "",
             "| Inputs | Method | " + " | ".join(TABLE1_HEADERS) + " |", "|" + "---|" * (len(TABLE1) + 2)]
    counts = sorted({int(c) for by_count in summary.values() for c in by_count})
    for count in counts:
        for method, by_count in summary.items():
            if str(count) in by_count:
                row = by_count[str(count)]
                lines.append(f"| {count}-input | {method} | " + " | ".join(_cell(row.get(m)) for m in TABLE1) + " |")
    lines += ["", "## JeDi Table 2 layout", "", "| Method | " + " | ".join(TABLE2) + " |",
              "|" + "---|" * (len(TABLE2) + 1)]
    for method, by_count in summary.items():
        for count in sorted(by_count, key=int):
            label = f"{method} ({count} input{'s' if count != '1' else ''})"
            lines.append(f"| {label} | " + " | ".join(_cell(by_count[count].get(m)) for m in TABLE2) + " |")
    lines += ["", "Images per row: " + ", ".join(f"{method} {count}-input: {row['images']}"
                                                  for method, by_count in summary.items()
                                                  for count, row in by_count.items())]
    if skipped:
        lines += ["", "## Skipped metrics", ""]
        lines += [f"- {metric}: skipped ({why})" for metric, why in skipped.items()]
    undetected = [(method, count, row["not_detected"]) for method, by_count in summary.items()
                  for count, row in by_count.items() if row.get("not_detected")]
    if undetected or notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {method} {count}-input: no object detected in {n} image(s); their whole image was compared"
                  for method, count, n in undetected]
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def write_results(out: pathlib.Path, records: Sequence[dict], skipped: dict, settings: dict,
                  notes: Sequence[str] = ()) -> dict:
    summary = aggregate(records)
    (out / "results.md").write_text(markdown(summary, skipped, notes), encoding="utf-8")
    payload = {"summary": summary, "skipped": skipped, "metrics": [m for m in METRICS if m not in skipped],
               "settings": settings, "notes": list(notes), "images": list(records)}
    (out / "results.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return summary


def grid(references: Sequence[pathlib.Path], rows: Sequence[tuple[str, Sequence[pathlib.Path]]],
         path: pathlib.Path, thumb: int = THUMB) -> None:
    """One PNG: per prompt a row of the input references, a gap, then the generations; the prompt above it."""
    from PIL import Image, ImageDraw, ImageOps

    label = 14
    columns = len(references) + 1 + max((len(images) for _, images in rows), default=0)
    canvas = Image.new("RGB", (columns * thumb, max(1, len(rows)) * (thumb + label)), "white")
    draw = ImageDraw.Draw(canvas)

    def paste(file, x, y):
        with Image.open(file) as image:
            canvas.paste(ImageOps.fit(image.convert("RGB"), (thumb, thumb)), (x, y))

    for r, (text, images) in enumerate(rows):
        top = r * (thumb + label)
        draw.text((2, top + 1), text, fill="black")
        for c, file in enumerate(references):
            paste(file, c * thumb, top + label)
        for c, file in enumerate(images):
            paste(file, (len(references) + 1 + c) * thumb, top + label)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
