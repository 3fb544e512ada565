"""The key sets docs/json.md pins for every `--json` output (and the web view's /api)."""
from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "json.md"


def documented_keys() -> dict[str, list[frozenset]]:
    """docs/json.md: {section title: [key set of each `keys:` line under it]}."""
    out: dict[str, list[frozenset]] = {}
    title = None
    for line in DOC.read_text().splitlines():
        if line.startswith("### "):
            title = line[4:].strip()
        elif line.startswith("keys:"):
            out.setdefault(title, []).append(
                frozenset(k.strip() for k in line[5:].split(",")))
    return out
