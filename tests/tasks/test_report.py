import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute
import pytest
from dask.utils import key_split
from distributed import Client, LocalCluster, get_task_stream
from PIL import Image
from pypdf import PdfReader
from scipy.spatial import procrustes
from scipy.spatial.distance import cdist, pdist

import tasks.report.numbers
import tasks.report.plots
import tasks.report.previews
import tasks.report.views
from flows.config import ThresherConfig
from flows.options import report_config, report_settings
from tasks.decoding import check_files
from tasks.dedup import classify
from tasks.gathering import load_embeddings
from tasks.listing import list_images
from tasks.report.build import build_report
from tasks.report.cache import CODE_IDENTITY, content_key, source_digest
from tasks.report.numbers import example_pairs, histogram, nearest_neighbours, pairwise_stats, savings
from tasks.report.plots import COLOURS, plot_pair
from tasks.report.previews import Thumbnails
from tasks.report.render import artifacts
from tasks.report.settings import PACKAGE, InProcess, ReportInputs
from tasks.report.views import pca_2d, start_views, umap_2d, umaps_2d
from tasks.selection.tasks import SelectOptions, select_samples, selected_filenames
from tasks.storage import write_parquet
from tests.images import picture, save, truncated
from tests.options import check_options, embed_options


def test_exact_stats_match_brute_force():
    x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    stats = pairwise_stats(x, memory_gb=1.0)
    reference = pdist(x.astype(np.float64))
    assert stats["exact"] and stats["n_pairs"] == len(reference)
    np.testing.assert_allclose(
        [stats["min"], stats["mean"], stats["max"]], [reference.min(), reference.mean(), reference.max()], rtol=1e-5
    )


def test_large_inputs_are_estimated_from_random_pairs_within_the_memory_cap():
    x = np.random.default_rng(1).normal(size=(3000, 8)).astype(np.float32)
    stats = pairwise_stats(x, memory_gb=1e-6)
    reference = pdist(x.astype(np.float64))
    assert not stats["exact"] and stats["n_pairs"] == 2_000_000
    assert abs(stats["mean"] - reference.mean()) < 0.01 * reference.mean()
    assert stats["cdf_error_95"] == pytest.approx(np.sqrt(np.log(40) / 4e6), rel=1e-3)


def test_fewer_than_two_samples_have_no_stats():
    assert pairwise_stats(np.zeros((1, 3), np.float32), 1.0) is None


def test_histogram_counts_every_pair_within_the_data_range():
    x = np.random.default_rng(2).normal(size=(400, 16)).astype(np.float32)
    hist = pairwise_stats(x, memory_gb=1.0)["histogram"]
    reference = pdist(x.astype(np.float64))
    assert sum(hist["counts"]) == len(reference) and len(hist["edges"]) == len(hist["counts"]) + 1
    assert (
        hist["edges"][0] <= reference.min() < hist["edges"][1]
        and hist["edges"][-2] <= reference.max() <= hist["edges"][-1]
    )
    assert hist["counts"][0] > 0 and hist["counts"][-1] > 0


def test_histogram_merges_fine_bins_into_at_most_the_requested_number():
    fine = np.zeros(1000, np.int64)
    fine[[100, 101, 350, 899]] = [1, 2, 3, 4]
    hist = histogram(fine, upper=10.0, bins=8)
    assert len(hist["counts"]) <= 8 and sum(hist["counts"]) == 10
    assert hist["edges"][0] == pytest.approx(1.0) and hist["edges"][-1] >= 9.0


def test_nearest_neighbours_skip_the_query_itself_and_find_exact_duplicates():
    x = np.random.default_rng(3).normal(size=(500, 12)).astype(np.float32)
    x[7] = x[42]
    queries = np.array([0, 7, 42, 499])
    rows, distances = nearest_neighbours(x, queries, np.arange(500))
    full = cdist(x[queries].astype(np.float64), x.astype(np.float64))
    full[np.arange(4), queries] = np.inf
    np.testing.assert_allclose(distances, full.min(axis=1), atol=1e-6)
    assert rows[1] == 42 and rows[2] == 7 and distances[1] == 0.0


def test_example_pairs_span_the_closest_to_the_farthest_retained_sample():
    x = np.random.default_rng(4).normal(size=(60, 5)).astype(np.float32)
    names = [f"f{i}" for i in range(60)]
    selected, removed = np.arange(0, 60, 3), np.setdiff1d(np.arange(60), np.arange(0, 60, 3))
    pairs = example_pairs(x, names, selected, removed, 4, seed=0)
    nearest = cdist(x[selected], x[removed]).min(axis=1)
    assert len(pairs) == 4 and [p["distance"] for p in pairs] == sorted(p["distance"] for p in pairs)
    assert pairs[0]["distance"] == pytest.approx(nearest.min()) and pairs[-1]["distance"] == pytest.approx(
        nearest.max()
    )
    assert all(
        p["retained"] in {names[i] for i in selected} and p["removed"] in {names[i] for i in removed} for p in pairs
    )


def test_a_pair_shows_the_retained_image_left_in_the_selected_colour_and_a_missing_one_as_no_preview(tmp_path):
    save(picture(1, (640, 480)), tmp_path / "kept.jpg", format="JPEG", quality=90)
    thumbnails = Thumbnails(tmp_path, 10**8)
    plot_pair(
        {"retained": "kept.jpg", "removed": "gone.jpg", "distance": 0.5},
        thumbnails.subset(["kept.jpg", "gone.jpg"]),
        tmp_path / "pair.jpg",
    )
    with Image.open(tmp_path / "pair.jpg") as image:
        width, height = image.size
        assert image.format == "JPEG" and width > 2 * height > 0
        pixels = np.asarray(image.convert("RGB")).astype(int)
    left, right = pixels[:, : width // 2], pixels[:, width // 2 :]
    orange = np.array(Image.new("RGB", (1, 1), COLOURS["selected"]).getpixel((0, 0)))
    assert (np.abs(left - orange).sum(axis=2) < 30).sum() > 100  # the frame around the retained image
    assert left.std() > 20 and right.std() < 20  # the picture on the left; a plain "no preview" cell on the right


def test_savings_count_removed_and_duplicate_images_at_the_configured_rates():
    settings = report_settings(ThresherConfig(input_dir="in", output_dir="out"))
    saved = savings({"n_removed": 700, "n_duplicate": 100, "n_sampled": 200, "n_corrupt": 5}, settings)
    assert saved["n_images_not_labelled"] == 800 and saved["dataset_reduction"] == 0.8
    assert saved["labeling_cost_saved_usd"] == 40.0 and saved["labeling_cost_selected_usd"] == 10.0
    assert saved["training_gpu_hours_saved"] == pytest.approx(800 * 0.1 / 3600, abs=1e-3)
    assert saved["co2_saved_kg"] == pytest.approx(800 * 0.1 / 3600 * 0.4 * 0.4, abs=1e-3)


N_GOOD, N_SELECT = 14, 5
TIMELINES = {"cam.mp4": [0.0, 1.5, 3.25], "sub/walk.avi": [2.0]}
HISTORY = [{"run": "2026-01-01_10-00-00", "n_samples": 120}, {"run": "2026-02-01_10-00-00", "n_samples": 40}]


def test_pca_finds_the_leading_principal_axes():
    rng = np.random.default_rng(6)
    x = (rng.normal(size=(300, 40)) * np.linspace(5, 0.1, 40)) @ np.linalg.qr(rng.normal(size=(40, 40)))[0]
    centred = x - x.mean(axis=0)
    axes = np.linalg.eigh(centred.T @ centred)[1][:, ::-1][:, :2]
    np.testing.assert_allclose(np.abs(pca_2d(x.astype(np.float32))), np.abs(centred @ axes), atol=1e-3)


def test_pca_of_too_few_or_identical_points_is_finite():
    assert pca_2d(np.ones((4, 8), np.float32)).tolist() == [[0.0, 0.0]] * 4
    two = pca_2d(np.array([[0, 0, 0], [1, 1, 1]], np.float32))
    assert two.shape == (2, 2) and abs(two[0, 0] - two[1, 0]) == pytest.approx(np.sqrt(3), rel=1e-5)


def test_content_keys_tell_values_types_and_shapes_apart():
    assert content_key([1, "a"], {"k": None}) == content_key((1, "a"), {"k": None})
    keys = {
        content_key(value) for value in (1, 1.0, "1", True, [1], np.ones(1), np.ones((1, 1)), np.ones(1, np.float32))
    }
    assert len(keys) == 8


def test_the_code_identity_changes_with_the_report_package_only(tmp_path):
    package = tmp_path / "report"
    shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    assert source_digest(package) == CODE_IDENTITY[1]
    (tmp_path / "other_stage.py").write_text("EDITED = True\n")  # code outside the package
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "plots.cpython-311.pyc").write_bytes(b"compiled")
    assert source_digest(package) == CODE_IDENTITY[1]
    for edited in (package / "plots.py", package / "templates" / "report.css"):
        original = edited.read_bytes()
        edited.write_bytes(original + b"\n")
        assert source_digest(package) != CODE_IDENTITY[1]
        edited.write_bytes(original)
    (package / "templates" / "report.css").rename(package / "templates" / "renamed.css")
    assert source_digest(package) != CODE_IDENTITY[1]


def _select_options(n_samples: int) -> SelectOptions:
    return SelectOptions("coreset", n_samples, None, True, 1, "cpu", 1)


# A small real run: 14 images, 3 planted exact duplicates (two copies of one image, one of
# another) and 2 corrupt files, classified by the real check and dedup stages, selected by coreset.
@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """build_report's arguments for the small run, less the run directory."""
    root = tmp_path_factory.mktemp("report")
    images, run_dir = root / "in", root / "run"
    for i in range(N_GOOD):
        save(picture(i), images / f"img_{i:02d}.jpg", format="JPEG", quality=90)
    for copy, source in (("copy_a1.jpg", "img_00.jpg"), ("copy_a2.jpg", "img_00.jpg"), ("copy_b.jpg", "img_01.jpg")):
        (images / copy).write_bytes((images / source).read_bytes())
    truncated(images / "broken.jpg")
    (images / "empty.png").write_bytes(b"")

    work = run_dir / "intermediate"
    samples = classify(check_files(images, list_images(images), check_options()), remove_exact_duplicates=True)
    write_parquet(samples, work / "samples.parquet")
    ok = [
        name
        for name, status in zip(samples.column("filename").to_pylist(), samples.column("status").to_pylist())
        if status == "ok"
    ]
    vectors = np.random.default_rng(5).normal(size=(len(ok), 16)).astype(np.float32)
    write_parquet(
        pa.table(
            {
                "filename": ok,
                "label": pa.array([0] * len(ok), pa.int32()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 16),
            }
        ),
        work / "embeddings.parquet",
    )
    config = ThresherConfig(
        input_dir=str(images), output_dir=str(root), n_example_images=4, stopping_condition={"n_samples": N_SELECT}
    )
    selection = select_samples.fn(work / "embeddings.parquet", _select_options(N_SELECT), work / "selection.parquet")
    counts = {
        "n_input_files": 19,
        "n_corrupt": 2,
        "n_duplicate": 3,
        "n_removed": N_GOOD - N_SELECT,
        "n_sampled": N_SELECT,
    }
    job = {
        "started": "2026-01-01T10:00:00+00:00",
        "finished": "2026-01-01T10:01:00+00:00",
        "duration_seconds": 60.0,
        "run_directory": str(run_dir),
    }
    stages = {"check": {"seconds": 2.0, "items": 19, "items_per_second": 9.5}}
    return {
        "samples_path": work / "samples.parquet",
        "embeddings_path": work / "embeddings.parquet",
        "selection_path": work / "selection.parquet",
        "job": job,
        "counts": counts,
        "stages": stages,
        "selection": selection,
        "config": report_config(config),
        "settings": report_settings(config),
        "video_timelines": TIMELINES,
        "datapool_history": HISTORY,
        "ok": ok,
        "vectors": vectors,
    }


def _build(inputs: dict, run_dir: Path, executor=InProcess(), started=None, **changes) -> dict:
    arguments = {key: value for key, value in inputs.items() if key not in ("ok", "vectors")}
    return build_report(ReportInputs(run_dir, **(arguments | changes)), executor, started)


@pytest.fixture(scope="module")
def run(inputs) -> tuple[Path, dict]:
    run_dir = inputs["samples_path"].parents[1]
    report = _build(inputs, run_dir)
    return run_dir, {
        "report": report,
        "ok": inputs["ok"],
        "vectors": inputs["vectors"],
        "selection": inputs["selection"],
    }


def test_report_json_lists_the_planted_corrupt_files_and_duplicate_groups(run):
    run_dir, _ = run
    report = json.loads((run_dir / "report.json").read_text())
    assert report["schema_version"] == 2 and report["counts"]["n_duplicate"] == 3
    files = report["files"]
    assert files["n_samples"] == 19 and files["n_corrupt"] == 2 and files["n_duplicate_groups"] == 2
    assert {c["filename"] for c in files["corrupt"]} == {"broken.jpg", "empty.png"}
    assert next(c["reason"] for c in files["corrupt"] if c["filename"] == "empty.png") == "empty file (0 bytes)"
    assert files["duplicate_groups"] == [
        {"kept": "copy_a1.jpg", "duplicates": ["copy_a2.jpg", "img_00.jpg"], "n_files": 3},
        {"kept": "copy_b.jpg", "duplicates": ["img_01.jpg"], "n_files": 2},
    ]
    assert report["savings"]["n_images_not_labelled"] == N_GOOD - N_SELECT + 3
    assert report["video_timelines"] == TIMELINES and report["datapool_history"] == HISTORY


def test_report_distances_are_exact_for_the_selection_and_all_samples(run):
    run_dir, data = run
    report = json.loads((run_dir / "report.json").read_text())
    unit = data["vectors"] / np.linalg.norm(data["vectors"], axis=1, keepdims=True)
    chosen = set(selected_filenames(run_dir / "intermediate" / "selection.parquet"))
    selected = np.array([f in chosen for f in data["ok"]])
    for name, rows in (("before", slice(None)), ("after", selected)):
        stats, reference = report["distances"][name], pdist(unit[rows].astype(np.float64))
        assert stats["n_samples"] == len(unit[rows]) and stats["pairwise"]["exact"]
        np.testing.assert_allclose(
            [stats["pairwise"][k] for k in ("min", "mean", "max")],
            [reference.min(), reference.mean(), reference.max()],
            rtol=1e-5,
        )
        assert stats["nearest_neighbour"]["exact"]
    assert report["distances"]["random"]["n_samples"] == N_SELECT
    # the coreset spreads out: its closest pair is farther apart than the closest pair overall
    assert report["distances"]["after"]["pairwise"]["min"] > report["distances"]["before"]["pairwise"]["min"]


def test_on_a_cluster_the_report_is_the_same_as_in_one_process(inputs, run, tmp_path):
    """The flow's way: UMAPs and plots run on the Dask workers, into the same run directory. (Worker
    threads here, to spare the test two processes importing torch; the flow tests run it on processes.)"""
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster,
        Client(cluster) as client,
        get_task_stream(client) as stream,
    ):
        report = _build(inputs, tmp_path / "cluster", executor=client.get_executor(pure=False))
    run_dir, data = run
    assert {key: report[key] for key in REUSED} == {key: data["report"][key] for key in REUSED}
    assert _pngs(tmp_path / "cluster") == _pngs(run_dir)
    ran = [key_split(task["key"]) for task in stream.data]
    assert ran.count("umaps_2d") == 1 and ran.count("plot_scatter") == 8 and ran.count("plot_pair") == 4


def test_on_a_warm_cluster_the_umaps_run_side_by_side_and_give_the_same_views(inputs):
    """A service's workers keep umap imported from run to run: a task per view there, one task on new workers."""
    normalized = load_embeddings(inputs["embeddings_path"], normalize=True)[2]
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster,
        Client(cluster) as client,
        get_task_stream(client) as stream,
    ):
        spread = start_views(normalized, inputs["settings"], executor=client.get_executor(pure=False), spread=True)
        side_by_side = spread.pending.result()
    together = start_views(normalized, inputs["settings"]).pending.result()
    assert [key_split(task["key"]) for task in stream.data].count("umaps_2d") == 3
    assert (
        [view["key"] for view in side_by_side]
        == [view["key"] for view in together]
        == ["pca", "umap_k_5", "umap_k_15", "umap_k_50"]
    )
    for ours, theirs in zip(side_by_side, together):
        np.testing.assert_array_equal(ours["xy"], theirs["xy"])


def test_views_started_before_the_selection_give_the_same_report(inputs, run, tmp_path):
    """The flow's way: it starts the projections from the embeddings alone, before selecting."""
    normalized = load_embeddings(inputs["embeddings_path"], normalize=True)[2]
    started = start_views(normalized, inputs["settings"])
    assert started is not None and started.n_run == len(inputs["ok"])
    report = _build(inputs, tmp_path / "started", started=started)
    run_dir, data = run
    assert {key: report[key] for key in REUSED} == {key: data["report"][key] for key in REUSED}
    assert _pngs(tmp_path / "started") == _pngs(run_dir)
    assert start_views(normalized[:0], inputs["settings"]) is None  # no samples of its own: nothing to project


def _plot_files(plots: dict) -> list[str]:
    """Every plot file a report names: one per key, a list, or a dict of them (strategies by index)."""
    values = [value.values() if isinstance(value, dict) else value for value in plots.values()]
    return [name for value in values for name in (value if not isinstance(value, str) else [value])]


def test_every_referenced_plot_exists_charts_as_pngs_and_image_pairs_as_jpegs(run):
    run_dir, _ = run
    plots = json.loads((run_dir / "report.json").read_text())["plots"]
    expected = {
        "distance_distr_before.png",
        "distance_distr_after.png",
        "scatter_pca.png",
        "scatter_pca_no_overlay.png",
        *(f"scatter_umap_k_{k}{suffix}.png" for k in (5, 15, 50) for suffix in ("", "_no_overlay")),
        *(f"filter_decision_{i}.jpg" for i in range(4)),
        "video_timelines.png",
        "datapool_growth.png",
    }
    assert expected <= set(_plot_files(plots))
    assert {p.name for p in (run_dir / "plots").iterdir()} == set(_plot_files(plots))
    for name in _plot_files(plots):
        with Image.open(run_dir / "plots" / name) as image:
            assert image.format == {".png": "PNG", ".jpg": "JPEG"}[Path(name).suffix]
            image.verify()


def test_the_pdf_holds_each_image_pair_as_the_jpeg_file_itself(run):
    # weasyprint decodes and compresses a PNG again for the PDF; a JPEG it copies (DCTDecode)
    run_dir, _ = run
    pdf = (run_dir / "report.pdf").read_bytes()
    pairs = sorted((run_dir / "plots").glob("*.jpg"))
    assert len(pairs) >= 4 and all(pair.read_bytes() in pdf for pair in pairs)
    assert pdf.count(b"/DCTDecode") >= len(pairs)


def test_pdf_has_every_section_and_the_numbers_of_the_json(run):
    run_dir, _ = run
    report = json.loads((run_dir / "report.json").read_text())
    text = " ".join(page.extract_text() for page in PdfReader(run_dir / "report.pdf").pages)
    text = re.sub(r"\s+", " ", text)
    for heading in (
        "Thresher report",
        "Job",
        "Estimated savings",
        "Selection",
        "Distances before and after selection",
        "Visualisation of the embeddings",
        "Retained and removed images",
        "Corrupt files (2)",
        "Exact duplicate groups (2)",
        "Video sampling timeline",
        "Datapool",
        "Configuration",
    ):
        assert heading in text, heading
    assert "empty file (0 bytes)" in text and "copy_a2.jpg" in text
    assert f"{report['distances']['after']['pairwise']['min']:.3f}" in text
    assert f"{report['savings']['labeling_cost_saved_usd']:.2f} USD" in text
    # every plot is in it (weasyprint leaves out, with a warning only, an image it cannot read)
    pictures = {(run_dir / "plots" / name).read_bytes() for name in _plot_files(report["plots"])}
    assert _pdf_images(run_dir / "report.pdf") >= len(pictures) >= 10


def _pdf_images(path: Path) -> int:
    """Image objects drawn on the pages of a PDF."""
    images = set()

    def walk(resources) -> None:
        for reference in (resources or {}).get("/XObject", {}).values():
            drawn = reference.get_object()
            if drawn["/Subtype"] == "/Image":
                images.add(reference.idnum)
            elif drawn["/Subtype"] == "/Form":
                walk(drawn.get("/Resources"))

    for page in PdfReader(path).pages:
        walk(page.get("/Resources"))
    return len(images)


def test_html_is_self_contained(run):
    run_dir, _ = run
    html = (run_dir / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', html)
    assert len(sources) >= 10 and all(
        s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in sources
    )
    assert any(s.startswith("data:image/jpeg;base64,") for s in sources)  # the image pairs
    assert "<link" not in html and "url(" not in html


def test_artifacts_have_valid_keys_and_the_counts(run):
    run_dir, data = run
    published = artifacts(data["report"], run_dir)
    assert all(re.fullmatch(r"[a-z0-9-]+", item["key"]) for item in published.values())
    assert {"count": "n_duplicate", "value": 3} in published["table"]["table"]
    assert published["link"]["link"] == (run_dir / "report.pdf").resolve().as_uri()
    assert "5 selected" in published["markdown"]["markdown"]


# The report cache: a rerun on the same data reuses, a changed input recomputes what depends on it.
REUSED = ("embedding_views", "distances", "example_pairs", "plots")


def _fail(*args, **kwargs):
    raise AssertionError("recomputed, although the cache holds it")


# The module that looks up each function the tests replace.
HOME = {
    "distance_statistics": tasks.report.numbers,
    "example_pairs": tasks.report.numbers,
    "pca_2d": tasks.report.views,
    "umap_2d": tasks.report.views,
    "_thumbnail": tasks.report.previews,
    "_save": tasks.report.plots,
}


def _count_calls(monkeypatch, name: str) -> list:
    calls: list = []
    original = getattr(HOME[name], name)
    monkeypatch.setattr(HOME[name], name, lambda *args, **kwargs: calls.append(name) or original(*args, **kwargs))
    return calls


def _pngs(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (run_dir / "plots").iterdir()}


def test_a_rerun_on_the_same_data_reuses_numbers_projections_and_plots(inputs, run, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = _build(inputs, tmp_path / "first", cache_dir=cache)
    stored = {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()}
    assert {p.parent.name for p in stored} == {"numbers", "arrays", "plots"}
    # a report computed on a miss is the one computed without a cache
    assert {key: first[key] for key in REUSED} == {key: run[1]["report"][key] for key in REUSED}

    for name in ("distance_statistics", "example_pairs", "pca_2d", "umap_2d", "_thumbnail", "_save"):
        monkeypatch.setattr(HOME[name], name, _fail)
    second = _build(inputs, tmp_path / "second", cache_dir=cache)
    assert {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()} == stored
    # exactly the same numbers and pictures, and a complete report around them
    assert {key: second[key] for key in REUSED} == {key: first[key] for key in REUSED}
    assert json.loads((tmp_path / "second" / "report.json").read_text())["distances"] == first["distances"]
    assert _pngs(tmp_path / "second") == _pngs(tmp_path / "first")
    text = " ".join(page.extract_text() for page in PdfReader(tmp_path / "second" / "report.pdf").pages)
    assert "Visualisation of the embeddings" in text and "Retained and removed images" in text


def test_a_new_selection_recomputes_its_numbers_and_plots_but_not_the_projections(inputs, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = _build(inputs, tmp_path / "first", cache_dir=cache)
    work = tmp_path / "work"
    wider = select_samples.fn(inputs["embeddings_path"], _select_options(N_SELECT + 3), work / "selection.parquet")
    distances, projections = _count_calls(monkeypatch, "distance_statistics"), _count_calls(monkeypatch, "umap_2d")
    second = _build(
        inputs, tmp_path / "second", cache_dir=cache, selection_path=work / "selection.parquet", selection=wider
    )
    assert distances and not projections  # the same embeddings: the same 2-D views
    assert second["distances"]["after"]["n_samples"] == N_SELECT + 3 != first["distances"]["after"]["n_samples"]
    assert second["embedding_views"] == first["embedding_views"]
    before, after = _pngs(tmp_path / "first"), _pngs(tmp_path / "second")
    assert after["distance_distr_before.png"] == before["distance_distr_before.png"]
    assert after["distance_distr_after.png"] != before["distance_distr_after.png"]
    assert after["scatter_pca_no_overlay.png"] != before["scatter_pca_no_overlay.png"]  # more points are orange


def test_changed_embeddings_recompute_the_projections(inputs, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _build(inputs, tmp_path / "first", cache_dir=cache)
    vectors = inputs["vectors"].copy()
    vectors[0] *= -1
    moved = _embeddings(inputs["ok"], vectors, tmp_path / "embeddings.parquet")
    projections = _count_calls(monkeypatch, "umap_2d")
    second = _build(inputs, tmp_path / "second", cache_dir=cache, embeddings_path=moved)
    assert len(projections) == 3
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert second["distances"]["before"]["pairwise"]["max"] == pytest.approx(
        pdist(unit.astype(np.float64)).max(), rel=1e-5
    )


def test_a_continued_umap_keeps_the_old_points_in_place():
    rng = np.random.default_rng(9)
    centres = rng.normal(size=(6, 16))
    points = (centres[rng.integers(0, 6, 330)] + 0.3 * rng.normal(size=(330, 16))).astype(np.float32)
    first = umap_2d(points[:300], 15, 0, pca_2d(points[:300]))
    continued = umap_2d(points, 15, 0, pca_2d(points), np.vstack([first, np.full((30, 2), np.nan, np.float32)]))
    afresh = umap_2d(points, 15, 0, pca_2d(points))
    assert procrustes(first, continued[:300])[2] < procrustes(first, afresh[:300])[2] / 4


def test_the_views_share_one_neighbour_search_and_are_the_umaps_of_their_own_k(monkeypatch):
    rng = np.random.default_rng(4)
    points = (rng.normal(size=(8, 16))[rng.integers(0, 8, 400)] + 0.3 * rng.normal(size=(400, 16))).astype(np.float32)
    pca = pca_2d(points)
    original, searched = tasks.report.views._knn, []
    monkeypatch.setattr(tasks.report.views, "_knn", lambda points, k: searched.append(k) or original(points, k))
    together = umaps_2d(points, {"umap_k_5": 5, "umap_k_15": 15}, 0, pca, {}, nearest=50)
    assert searched == [50]
    for view, k in (("umap_k_5", 5), ("umap_k_15", 15)):
        np.testing.assert_array_equal(together[view], umap_2d(points, k, 0, pca))


# A fresh process runs one UMAP and reports how often, meanwhile, numba found umap's compiled
# functions in its cache and how often it compiled them (umap compiles a few at its import), and
# whether umap's modules were frozen with the collector running again.
UMAP_IN_A_NEW_PROCESS = """
import gc, json, sys
import numpy as np
from numba.core.dispatcher import Dispatcher
from tasks.report.views import import_umap, pca_2d, umap_2d

def counts():
    functions = [v for n, m in sys.modules.copy().items() if n.startswith("umap.") for v in vars(m).values()
                 if isinstance(v, Dispatcher)]
    return [sum(len(f.stats.cache_hits) for f in functions), sum(len(f.stats.cache_misses) for f in functions)]

import_umap()
hits, misses = counts()
points = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
umap_2d(points, 5, 0, pca_2d(points))
frozen = gc.get_freeze_count() > 100_000 and gc.isenabled()
print(json.dumps({"hits": counts()[0] - hits, "misses": counts()[1] - misses, "frozen": frozen}))
"""


def test_umap_is_compiled_once_and_then_read_from_the_numba_cache(tmp_path):
    def run() -> dict:
        env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
        done = subprocess.run([sys.executable, "-c", UMAP_IN_A_NEW_PROCESS], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert first["frozen"]  # umap's modules, out of the collector's passes (tasks/imports.py)
    assert first["misses"] > 0 and first["hits"] == 0
    # Functions that the cached ones call were compiled into them: the second run loads fewer.
    assert second["misses"] == 0 and second["hits"] > 0
    assert list((tmp_path / "numba").rglob("*.nbi"))


def _embeddings(names: list[str], vectors: np.ndarray, path: Path) -> Path:
    return write_parquet(
        pa.table(
            {
                "filename": names,
                "label": pa.array([0] * len(names), pa.int32()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 16),
            }
        ),
        path,
    )


def _umap_starts(monkeypatch) -> list[bool]:
    """Whether each umap_2d call continued a previous layout."""
    starts: list[bool] = []
    original = tasks.report.views.umap_2d
    monkeypatch.setattr(
        tasks.report.views,
        "umap_2d",
        lambda points, k, seed, pca, previous=None, knn=None: (
            starts.append(previous is not None) or original(points, k, seed, pca, previous, knn)
        ),
    )
    return starts


def test_a_grown_input_continues_the_previous_layout(inputs, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    starts = _umap_starts(monkeypatch)
    first = _build(inputs, tmp_path / "first", cache_dir=cache)
    new = np.random.default_rng(7).normal(size=(3, 16)).astype(np.float32)
    grown = _embeddings(
        inputs["ok"] + ["new_0.jpg", "new_1.jpg", "new_2.jpg"],
        np.vstack([inputs["vectors"], new]),
        tmp_path / "grown.parquet",
    )
    second = _build(inputs, tmp_path / "second", cache_dir=cache, embeddings_path=grown)
    # an input of mostly other points starts afresh
    other = np.random.default_rng(8).normal(size=(len(inputs["ok"]), 16)).astype(np.float32)
    third = _build(
        inputs,
        tmp_path / "third",
        cache_dir=cache,
        embeddings_path=_embeddings(inputs["ok"], other, tmp_path / "other.parquet"),
    )

    def continued(report: dict) -> list[int]:
        return [view["continued_points"] for view in report["embedding_views"]["views"] if view["key"] != "pca"]

    assert continued(first) == [0, 0, 0] and continued(second) == [N_GOOD] * 3 and continued(third) == [0, 0, 0]
    assert starts == [False] * 3 + [True] * 3 + [False] * 3
    text = re.sub(
        r"\s+", " ", " ".join(page.extract_text() for page in PdfReader(tmp_path / "second" / "report.pdf").pages)
    )
    assert f"start from the previous report's layout of this input, where {N_GOOD} of their points were" in text


def test_a_changed_image_redraws_the_plots_that_show_it(inputs, tmp_path):
    images = tmp_path / "in"
    shutil.copytree(inputs["config"]["input_dir"], images)
    config = inputs["config"] | {"input_dir": str(images)}
    settings = dataclasses.replace(inputs["settings"], input_dir=str(images))
    cache = tmp_path / "cache"
    first = _build(inputs, tmp_path / "first", cache_dir=cache, config=config, settings=settings)
    shown = first["example_pairs"][0]["retained"]
    save(picture(99), images / shown, format="JPEG", quality=90)
    second = _build(inputs, tmp_path / "second", cache_dir=cache, config=config, settings=settings)
    before, after = _pngs(tmp_path / "first"), _pngs(tmp_path / "second")
    assert after["filter_decision_0.jpg"] != before["filter_decision_0.jpg"]
    unchanged = [name for name in before if name.startswith(("distance", "nn_", "video", "datapool"))]
    assert unchanged and all(after[name] == before[name] for name in unchanged)
    assert second["example_pairs"] == first["example_pairs"]


def test_a_run_without_samples_of_its_own_projects_nothing(inputs, tmp_path, monkeypatch):
    work = tmp_path / "work"
    write_parquet(
        pa.table(
            {
                "filename": pa.array([], pa.string()),
                "label": pa.array([], pa.int32()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array([], pa.float32()), 16),
            }
        ),
        work / "embeddings.parquet",
    )
    selection = select_samples.fn(work / "embeddings.parquet", _select_options(N_SELECT), work / "selection.parquet")
    for name in ("pca_2d", "umap_2d", "_thumbnail"):
        monkeypatch.setattr(HOME[name], name, _fail)
    counts = {
        "n_input_files": 0,
        "n_corrupt": 0,
        "n_duplicate": 0,
        "n_removed": 0,
        "n_sampled": 0,
        "n_skipped_processed": 19,
    }
    report = _build(
        inputs,
        tmp_path / "empty",
        embeddings_path=work / "embeddings.parquet",
        selection_path=work / "selection.parquet",
        selection=selection,
        counts=counts,
        video_timelines=None,
        cache_dir=tmp_path / "cache",
    )
    assert report["embedding_views"]["views"] == [] and report["example_pairs"] == []
    assert set(report["plots"]) == {"filter_decisions", "datapool_growth"}
    text = re.sub(
        r"\s+", " ", " ".join(page.extract_text() for page in PdfReader(tmp_path / "empty" / "report.pdf").pages)
    )
    assert "this run has no embedded samples; its files were all processed by earlier runs" in text


def test_the_report_module_does_not_load_torch():
    """Its UMAPs and plots run on the workers that replace the embedding ones; torch (with timm and
    torchvision) would add about half a GB of resident memory to each."""
    code = (
        "import sys, tasks.report.build; print(sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


# The report on the example data: two folders of photo crops (two labels), embedded by the packaged
# model, selected by coreset.
EXAMPLES = Path(__file__).parents[2] / "examples" / "images"
N_EXAMPLE_SELECT = 12


@pytest.fixture(scope="module")
def example_report(tmp_path_factory) -> tuple[Path, dict]:
    from tasks.backbones import load_backbone
    from tasks.embedding import embed_sources

    run_dir = tmp_path_factory.mktemp("examples")
    work = run_dir / "intermediate"
    files = list_images(EXAMPLES)
    samples = classify(check_files(EXAMPLES, files, check_options()), remove_exact_duplicates=True)
    write_parquet(samples, work / "samples.parquet")
    ok = set(samples.filter(pa.compute.equal(samples.column("status"), "ok")).column("filename").to_pylist())
    sources = [file for file in files if file.filename in ok]
    model = load_backbone("efficientnet-lite0", 32, None, 1, "cpu")
    names, vectors, errors, _ = embed_sources(EXAMPLES, sources, model, embed_options(input_size=96, batch_size=8))
    assert errors == [None] * len(names)
    write_parquet(
        pa.table(
            {
                "filename": names,
                "label": pa.array([file.label for file in sources], pa.int32()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]),
            }
        ),
        work / "embeddings.parquet",
    )
    selection = select_samples.fn(
        work / "embeddings.parquet", _select_options(N_EXAMPLE_SELECT), work / "selection.parquet"
    )
    status = samples.column("status").to_pylist()
    counts = {
        "n_input_files": len(status),
        "n_corrupt": status.count("corrupt"),
        "n_duplicate": status.count("duplicate"),
        "n_removed": len(names) - N_EXAMPLE_SELECT,
        "n_sampled": N_EXAMPLE_SELECT,
    }
    config = ThresherConfig(
        input_dir=str(EXAMPLES),
        output_dir=str(run_dir),
        n_example_images=2,
        stopping_condition={"n_samples": N_EXAMPLE_SELECT},
    )
    job = {
        "started": "2026-01-01T10:00:00+00:00",
        "finished": "2026-01-01T10:01:00+00:00",
        "duration_seconds": 60.0,
        "run_directory": str(run_dir),
    }
    report = build_report(
        ReportInputs(
            run_dir,
            work / "samples.parquet",
            work / "embeddings.parquet",
            work / "selection.parquet",
            job,
            counts,
            {},
            selection,
            report_config(config),
            report_settings(config),
        )
    )
    return run_dir, report


def test_the_example_report_compares_the_selection_with_random_and_shows_how_many_to_label(example_report):
    run_dir, report = example_report
    quality = json.loads((run_dir / "report.json").read_text())["selection_quality"]
    assert quality == report["selection_quality"] and quality["labelled"]
    n = report["distances"]["before"]["n_samples"]
    probe = quality["probe"]
    assert probe["n_classes"] == 2 and probe["eval_exact"] and probe["n_eval"] == n
    assert [(b["n_samples"], b["source"]) for b in probe["budgets"]] == [
        (3, "prefix"),
        (6, "prefix"),
        (N_EXAMPLE_SELECT, "run"),
        (n // 2, "re-run"),
    ]
    for budget in probe["budgets"]:
        assert 0 <= budget["selection"] <= 1 and len(budget["random"]) == 5
        assert budget["gain_points"] == pytest.approx(100 * (budget["selection"] - budget["random_mean"]), abs=0.01)
    advice = quality["how_many"]
    assert advice["k"] == N_EXAMPLE_SELECT and advice["curve"]["n_selected"][-1] == N_EXAMPLE_SELECT
    assert advice["lower_bound"] == pytest.approx(advice["radius"] / 2, rel=1e-6)  # coreset: the bound is r / 2
    calibration = quality["min_distance"]
    assert calibration["nn_min"] <= calibration["suggested_min_distance"] <= calibration["nn_max"]
    assert quality["label_free"]["selection"]["covering_radius"] == pytest.approx(advice["radius"], rel=1e-4)
    plots = report["plots"]
    assert {"selection_probe", "how_many", "min_distance", "min_distance_below", "min_distance_above"} <= set(plots)
    for name in _plot_files({key: plots[key] for key in ("selection_probe", "how_many", "min_distance")}):
        with Image.open(run_dir / "plots" / name) as image:
            image.verify()
    text = re.sub(r"\s+", " ", " ".join(page.extract_text() for page in PdfReader(run_dir / "report.pdf").pages))
    for heading in (
        "Selection quality",
        "Does the selection beat random?",
        "How many should we label?",
        "A calibrated min_distance",
    ):
        assert heading in text, heading
    run_budget = next(b for b in probe["budgets"] if b["source"] == "run")
    assert f"{run_budget['random_mean']:.3f} ± {run_budget['random_std']:.3f}" in text
    assert f"{advice['lower_bound']:.4f}" in text
