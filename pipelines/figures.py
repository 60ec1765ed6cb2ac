"""Export the plots of the latest materializations (PNG metadata) to a folder, e.g. for a paper or README.

    python -m pipelines.figures docs/images
"""

from __future__ import annotations

import base64
import re
import sys
from pathlib import Path

import dagster as dg

PNG_IN_MARKDOWN = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


def export_figures(instance: dg.DagsterInstance, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key in sorted(instance.get_asset_keys(), key=lambda key: key.to_user_string()):
        event = instance.get_latest_materialization_event(key)
        if event is None or event.asset_materialization is None:
            continue
        for name, value in event.asset_materialization.metadata.items():
            match = PNG_IN_MARKDOWN.search(str(getattr(value, "value", "")))
            if match:
                path = out_dir / f"{'_'.join(key.path)}__{name}.png"
                path.write_bytes(base64.b64decode(match.group(1)))
                written.append(path)
    return written


def main(argv: list[str]) -> int:
    out_dir = Path(argv[0] if argv else "figures")
    for path in export_figures(dg.DagsterInstance.get(), out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
