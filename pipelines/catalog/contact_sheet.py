"""A contact sheet of sample products with their titles (docs/catalog_contact_sheet.png).

The first rows show one near-duplicate family per varying attribute side by side (the hard
negatives), the rest a spread of kinds; each cell shows the listing title and the family's
varying attribute.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from pipelines.catalog.plan import ProductPlan

CELL = 220  # thumbnail side in pixels
TEXT_H = 74  # room for three lines of title under each thumbnail


def pick_samples(
    products: Sequence[ProductPlan], families_per_axis: int = 1, singles: int = 8
) -> list[list[ProductPlan]]:
    """Rows of the sheet: whole families (one per axis), then a row or two of varied kinds."""
    by_family: dict[str, list[ProductPlan]] = {}
    for p in products:
        by_family.setdefault(p.family_id, []).append(p)
    rows: list[list[ProductPlan]] = []
    for axis in ("color", "pattern", "material", "brand"):
        fams = [f for f in by_family.values() if f[0].differs_by == axis and len(f) >= 3][
            :families_per_axis
        ]
        rows.extend(fams)
    seen_kinds = {p.kind for row in rows for p in row}
    spread = []
    for fam in by_family.values():
        if fam[0].kind not in seen_kinds and len(spread) < singles:
            spread.append(fam[0])
            seen_kinds.add(fam[0].kind)
    rows.extend(spread[i : i + 4] for i in range(0, len(spread), 4))
    return rows


def write_contact_sheet(products: Sequence[ProductPlan], out: str | Path) -> Path:
    from pipelines.catalog.render import render_product
    from pipelines.catalog.writer import render_spec

    rows = pick_samples(products)
    cols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (cols * CELL, len(rows) * (CELL + TEXT_H)), "white")
    draw = ImageDraw.Draw(sheet)
    from pipelines.catalog.render import brand_font_path, truetype_font

    # The renderer's rule: the CJK font, or Pillow's default (Chinese as empty boxes) with a warning.
    font = truetype_font(brand_font_path(" ".join(p.title for row in rows for p in row)), 12)
    for r, row in enumerate(rows):
        for c, p in enumerate(row):
            im = render_product(render_spec(p))
            im.thumbnail((CELL - 8, CELL - 8))
            x, y = c * CELL, r * (CELL + TEXT_H)
            sheet.paste(im, (x + (CELL - im.width) // 2, y + 4))
            tag = f"{p.product_id} [{p.title_lang}] {p.split}" + (
                f" · varies: {p.differs_by}" if p.differs_by else ""
            )
            lines = [tag, *textwrap.wrap(p.title, width=34 if p.title_lang != "zh" else 17)[:3]]
            for i, line in enumerate(lines[:4]):
                draw.text(
                    (x + 4, y + CELL + i * 17),
                    line,
                    fill=(90, 90, 90) if i == 0 else (20, 20, 20),
                    font=font,
                )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)
    return out
