"""Stage 9: the run report: `report.json`, `report.html` (self-contained), `report.pdf` and `plots/`
(charts as PNG, pictures of images as JPEG), with a summary published as Prefect artifacts.

The report shows what was kept, what was removed and why: job information and counts, estimated
savings, distance statistics before and after selection (against a random subset of the same
size as a baseline), distance histograms, 2-D views of the embeddings, retained images beside
their nearest removed neighbour, corrupt files and duplicate groups, and, when given, video
timelines and datapool growth. It is built in three steps that are tested on their own:
numbers (a JSON-ready dict, `numbers`) -> plots (PNG and JPEG files drawn from the numbers and a few
arrays, `views`, `previews`, `plots`) -> HTML (a jinja2 template) -> PDF (weasyprint renders the
same HTML, `render`); `build` runs them. With a cache directory, the slow results (distance
numbers, 2-D projections, plots) are stored under a hash of their inputs and reused by a later run
whose inputs are the same (`cache.ReportCache`); the UMAPs of a grown input continue the previous
report's layout, so successive reports show the data alike.
"""
