import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from upath import UPath

from tasks import backbones, decoding, listing
from tasks.backbones import load_backbone
from tasks.decoding import CHECK_SCHEMA, check_files, open_image, read_checks
from tasks.embedding import embed_sources
from tasks.listing import InputFile, list_images
from tasks.one_pass import check_and_embed
from tasks.sharding import video_shards
from tasks.storage import write_parquet
from tasks.video.probe import VIDEO_SCHEMA, probe_row
from tests.images import picture, save, truncated
from tests.options import check_options, embed_options
from tests.videos import frames, write_video

EXAMPLES = Path(__file__).parents[2] / "examples" / "images"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, list]:
    """Photos, an exact duplicate, a truncated JPEG, a PNG named .jpg, and a video's frames."""
    root = tmp_path_factory.mktemp("mixed")
    for name in ("chelsea_00.jpg", "coffee_01.jpg", "rocket_02.jpg"):
        shutil.copy(EXAMPLES / "objects" / name, root / name)
    shutil.copy(EXAMPLES / "objects" / "chelsea_00.jpg", root / "copy.jpg")
    truncated(root / "cut.jpg", seed=3)
    save(picture(4), root / "png.jpg", format="PNG")
    write_video(root / "clip.mp4", frames(6))
    files = list_images(UPath(root))
    images = [f for f in files if not f.filename.endswith(".mp4")]
    videos = pa.Table.from_pylist([probe_row(UPath(root), f, False) for f in files if f not in images], VIDEO_SCHEMA)
    [ranges] = video_shards(videos, 256, 1)
    return root, [*images, *ranges]


def test_one_pass_finds_what_the_check_and_the_embedding_find_apart(mixed):
    root, sources = mixed
    model = load_backbone("efficientnet-lite0", 32, None, 1, "cpu")
    table, seconds = check_and_embed(UPath(root), sources, model, check_options(), embed_options(batch_size=4))
    checked = check_files(UPath(root), sources, check_options())
    assert table.select(CHECK_SCHEMA.names).equals(checked) and seconds > 0
    errors = dict(zip(checked.column("filename").to_pylist(), checked.column("error").to_pylist()))
    assert errors["cut.jpg"].startswith("decoding failed") and errors["png.jpg"].startswith("wrong extension")

    usable = [s for s in sources if errors.get(s.names()[0]) is None]
    names, vectors, embed_errors, _ = embed_sources(UPath(root), usable, model, embed_options(batch_size=3))
    assert embed_errors == [None] * len(names) and len(names) == 4 + 6
    embedded = dict(zip(table.column("filename").to_pylist(), table.column("embedding").to_pylist()))
    assert [embedded[n] for n in errors if errors[n]] == [None, None]  # unusable: no embedding
    assert np.abs(np.array([embedded[n] for n in names]) - vectors).max() < 1e-4  # batching differs


def _recorded(spans: dict[str, list[tuple[float, float]]], name: str, function):
    """function, with the start and end of each of its calls appended to spans[name]."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spans[name].append((start, time.perf_counter()))

    return wrapper


def test_one_pass_reads_and_decodes_each_image_once(mixed, monkeypatch):
    root, sources = mixed
    images = [s for s in sources if isinstance(s, InputFile)]
    calls: dict[str, list[tuple[float, float]]] = {"read": [], "decode": []}
    monkeypatch.setattr(listing, "read_bytes", _recorded(calls, "read", listing.read_bytes))
    monkeypatch.setattr(decoding, "decode", _recorded(calls, "decode", decoding.decode))
    model = load_backbone("efficientnet-lite0", 32, None, 1, "cpu")
    check_and_embed(UPath(root), images, model, check_options(), embed_options())
    # every file is read once; all but the PNG named .jpg (refused from its header) are decoded once
    assert {name: len(spans) for name, spans in calls.items()} == {"read": len(images), "decode": len(images) - 1}


@pytest.mark.parametrize("one_pass", [True, False], ids=["check and embed", "embed"])
def test_images_are_not_decoded_while_the_model_computes_a_batch_on_the_cpu(mixed, monkeypatch, one_pass):
    """The model and the decoding thread take turns (tasks.embedding.Turns). A decode may begin
    just as the model's turn begins, but no other: without turns, the thread decodes the next
    images meanwhile."""
    root, sources = mixed
    images = [s for s in sources if isinstance(s, InputFile)] * 4
    spans: dict[str, list[tuple[float, float]]] = {"decode": [], "model": []}
    monkeypatch.setattr(decoding, "decode", _recorded(spans, "decode", decoding.decode))
    monkeypatch.setattr(backbones, "forward", _recorded(spans, "model", backbones.forward))
    model = load_backbone("efficientnet-lite0", 32, None, 1, "cpu")
    if one_pass:
        check_and_embed(UPath(root), images, model, check_options(), embed_options(batch_size=4))
    else:
        embed_sources(UPath(root), images, model, embed_options(batch_size=4))
    assert len(spans["model"]) >= 5 and len(spans["decode"]) >= 20
    begun = [sum(start < decode < end for decode, _ in spans["decode"]) for start, end in spans["model"]]
    assert max(begun) <= 1, begun


def test_a_decode_over_its_time_limit_is_left_behind_and_the_others_are_embedded(tmp_path):
    for name in ("chelsea_00.jpg", "coffee_01.jpg", "rocket_02.jpg"):
        shutil.copy(EXAMPLES / "objects" / name, tmp_path / name)
    # A real slow decode: 6000x6000 of deflated zeros is 100 kB on disk and a 36 MP decode.
    save(Image.new("L", (6000, 6000)), tmp_path / "b_slow.png")
    files = list_images(UPath(tmp_path))
    model = load_backbone("efficientnet-lite0", 32, None, 1, "cpu")
    options = check_options(decode_timeout=0.02)
    table, _ = check_and_embed(UPath(tmp_path), files, model, options, embed_options(batch_size=2))
    rows = {row["filename"]: row for row in table.to_pylist()}
    slow = rows.pop("b_slow.png")
    # The row a timed-out decode gives, with the file's hash; the files after it go on.
    assert slow["error"] == "decoding timed out: gave up after 0.02 s (corruptness_check.decode_timeout)"
    assert slow["content_hash"] and slow["embedding"] is None
    assert len(rows) == 3 and all(row["error"] is None and row["embedding"] for row in rows.values())


def test_a_piece_of_the_one_pass_reads_as_a_check_table(mixed, tmp_path):
    root, sources = mixed
    model = load_backbone("resnet-18", 8, None, 1, "cpu")
    table, _ = check_and_embed(UPath(root), sources[:3], model, check_options(), embed_options())
    path = write_parquet(table, UPath(tmp_path / "piece.parquet"))
    assert read_checks([path]).schema == CHECK_SCHEMA and len(read_checks([path, path])) == 6


def test_without_the_check_the_decoder_scales_a_large_jpeg_down_to_the_input(tmp_path):
    data = save(picture(5, (1024, 768)), tmp_path / "big.jpg").read_bytes()
    assert open_image(data, 10**8).size == (1024, 768)
    assert open_image(data, 10**8, least_size=64).size == (128, 96)  # 1/8: both sides still >= 64
    assert open_image(data, 10**8, least_size=200).size == (512, 384)  # 1/4 would make 192 < 200
    png = save(picture(5, (1024, 768)), tmp_path / "big.png").read_bytes()
    assert open_image(png, 10**8, least_size=64).size == (1024, 768)  # PNG has no scaled decoding

    model = load_backbone("efficientnet-lite0", 32, None, 1, "cpu")
    files = [InputFile("big.jpg", 0, 1, "0.0")]
    _, full, _, _ = embed_sources(UPath(tmp_path), files, model, embed_options(full_decode=True))
    _, scaled, _, _ = embed_sources(UPath(tmp_path), files, model, embed_options(full_decode=False))
    cosine = float(full[0] @ scaled[0] / np.linalg.norm(full[0]) / np.linalg.norm(scaled[0]))
    assert cosine > 0.95 and np.abs(full - scaled).max() > 1e-4  # close, not the same pixels
