"""Make `dvc plots show` and `dvc plots diff` pages that open offline, in this repository.

Writes ``.dvc/tmp/offline-plots.html`` (mnist_pipeline.core.figures.offline_page: the Vega
scripts inline) and sets ``plots.html_template`` in ``.dvc/config.local`` (not committed:
each clone runs this, which ``make setup`` does). Usage: ``python tools/plots_page.py [REPO]``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mnist_pipeline.core import atomic, figures

PAGE = Path("tmp") / "offline-plots.html"  # relative to .dvc/, as DVC reads the setting


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    repo = Path(args[0] if args else ".").resolve()
    dvc_dir = repo / ".dvc"
    if not dvc_dir.is_dir():
        print(f"error: {repo} is not a DVC repository (no .dvc/)", file=sys.stderr)
        return 1
    atomic.write_bytes(dvc_dir / PAGE, figures.offline_page().encode())
    setting = [sys.executable, "-m", "dvc", "config", "--local", "plots.html_template", str(PAGE)]
    subprocess.run(setting, cwd=repo, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
