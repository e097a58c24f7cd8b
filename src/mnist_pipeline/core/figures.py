"""Pictures from Vega-Lite specs, drawn by vl-convert, and the offline page for DVC's plots.

Vega-Lite is the grammar DVC's own plots are written in, and vl-convert (the Vega project's
renderer) draws a spec to PNG with no browser and no network. Matplotlib is not an option in
this environment: Keras imports it on every ``import tensorflow`` when it is installed
(pyproject.toml, ``[tool.uv]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mnist_pipeline.core import atomic

# DVC's templates are Vega-Lite 5 specs (dvc_render's page loads vega-lite@5 from a CDN).
VEGA_LITE = "5.21"
SCHEMA = "https://vega.github.io/schema/vega-lite/v5.json"


def save_png(spec: dict[str, Any], path: Path, scale: float = 2.0) -> None:
    """Draw ``spec`` to ``path`` (written whole or not at all). ``scale`` 2: sharp on a
    high-density screen; the spec's sizes stay the layout's."""
    import vl_convert

    png = vl_convert.vegalite_to_png({"$schema": SCHEMA, **spec}, vl_version=VEGA_LITE, scale=scale)
    atomic.write_bytes(path, png)


def offline_page() -> str:
    """An HTML template for ``dvc plots show/diff --html-template``: DVC's own page loads
    vega, vega-lite and vega-embed from cdn.jsdelivr.net, so offline it opens blank. This one
    carries them (vl-convert's bundle sets ``window.vegaEmbed``, which DVC's plot scripts
    call) and has no ``{scripts}`` placeholder, so DVC adds no CDN tag. DVC fills in
    ``{plot_divs}``."""
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)
    if "</script" in bundle:  # would end the inline script early
        raise RuntimeError("the Vega bundle contains '</script': cannot inline it")
    return (
        '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n<title>DVC plots</title>\n'
        f"<script>\n{bundle}\n</script>\n"
        "<style>table { border-spacing: 15px; }</style>\n"
        "</head>\n<body>\n{plot_divs}\n</body>\n</html>\n"
    )
