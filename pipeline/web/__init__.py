"""A read-only web view of the lineage database: runs, the candidate tree, diffs and
curves, following a running run live (`selfprog-cli serve`).

pipeline/web/app.py: the pages and their JSON twins (docs/json.md); figures.py: the
geometry of the SVG figures; templates/ and static/: what the browser gets.
"""
from pipeline.web.app import create_app

__all__ = ["create_app"]
