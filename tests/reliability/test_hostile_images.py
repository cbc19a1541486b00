"""Hostile image inputs: every listed file is checked with the right reason or used, nothing hangs,
and a whole run over the corpus accounts for every file."""

from __future__ import annotations

import functools
import json
import os
import resource
import time

import numpy as np
import pytest
from PIL import Image

from flows.cli import main
from tasks.decoding import check_files, open_image
from tasks.embedding import Turns, _image_input
from tasks.listing import InputFile, list_images
from tasks.models import EmbedOptions
from tests.images import picture, save
from tests.options import check_options, embed_options
from tests.reliability.corpus import hostile_images


def load_image(path, max_pixels: int) -> Image.Image:
    return open_image(path.read_bytes(), max_pixels)


def _load(input_dir, filename: str, options: EmbedOptions):
    """The embedder's input from a file, or why there is none, as the embed stage reads it."""
    image = functools.partial(_image_input, options=options, turns=Turns())
    [(_, found)] = InputFile(filename, 0, 1, "0.0").read(input_dir, image, None)
    return found


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return root / "in", hostile_images(root / "in", root / "outside")


def test_listing_finds_every_file_and_no_trap(corpus):
    root, expected = corpus
    assert sorted(f.filename for f in list_images(root)) == sorted(expected)


def test_check_gives_each_file_its_fate(corpus):
    root, expected = corpus
    start, peak = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = {row["filename"]: row for row in check_files(root, list_images(root), check_options()).to_pylist()}
    assert time.perf_counter() - start < 30, "a file stalled the check"
    # The bomb declares 10^10 pixels (30 GB decoded): it must be refused from its header.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200 * 1024, "memory was not bounded"
    for name, reason in expected.items():
        if reason is None:
            assert rows[name]["error"] is None, (name, rows[name]["error"])
        else:
            assert rows[name]["error"] and reason in rows[name]["error"], (name, rows[name]["error"])
    assert (rows["unusual/exif_rotated.jpg"]["width"], rows["unusual/exif_rotated.jpg"]["height"]) == (64, 96)
    assert (rows["unusual/strip_100000x1.png"]["width"], rows["unusual/strip_100000x1.png"]["height"]) == (100_000, 1)


def test_decoded_pixels_are_the_picture(corpus):
    root, _ = corpus
    # 16-bit is scaled rather than clipped to white; transparency is put on white; animation gives frame 1.
    assert len(np.unique(np.asarray(load_image(root / "unusual/sixteen_bit.png", 10**6)))) > 100
    with Image.open(root / "unusual/palette_transparent.png") as palette:
        transparent = np.asarray(palette) == 0
    assert (
        transparent.any()
        and (np.asarray(load_image(root / "unusual/palette_transparent.png", 10**6))[transparent] == 255).all()
    )
    with Image.open(root / "unusual/animated.gif") as gif:
        first = gif.convert("RGB")
    assert load_image(root / "unusual/animated.gif", 10**6).tobytes() == first.tobytes()


def test_pixel_limit_is_configurable(tmp_path):
    save(picture(1, (100, 100)), tmp_path / "a.png")
    files = list_images(tmp_path)
    assert check_files(tmp_path, files, check_options(max_pixels=10_000)).column("error")[0].as_py() is None
    error = check_files(tmp_path, files, check_options(max_pixels=9_999)).column("error")[0].as_py()
    assert error.startswith("decompression bomb: 100x100 = 10000 pixels exceeds corruptness_check.max_pixels=9999")


def test_slow_decode_times_out(tmp_path):
    # A real slow decode: 6000x6000 of deflated zeros is 100 kB on disk and a 36 MP decode.
    save(Image.new("L", (6000, 6000)), tmp_path / "slow.png")
    files = list_images(tmp_path)
    start = time.perf_counter()
    error = check_files(tmp_path, files, check_options(decode_timeout=0.001)).column("error")[0].as_py()
    assert time.perf_counter() - start < 5
    assert error.startswith("decoding timed out") and "corruptness_check.decode_timeout" in error
    assert _load(tmp_path, "slow.png", embed_options(decode_timeout=0.001)).startswith("decoding timed out")


def test_files_that_vanish_or_change_after_listing(tmp_path):
    for i in range(3):
        save(picture(i), tmp_path / f"{i}.jpg", format="JPEG")
    files = list_images(tmp_path)
    (tmp_path / "0.jpg").unlink()
    (tmp_path / "1.jpg").write_bytes(b"\xff\xd8 no longer a jpeg")
    (tmp_path / "2.jpg").unlink()
    (tmp_path / "2.jpg").mkdir()  # replaced by a folder of the same name
    errors = check_files(tmp_path, files, check_options()).column("error").to_pylist()
    assert errors[0] == "unreadable: No such file or directory"
    assert errors[1].startswith("not a recognised image format")
    assert errors[2] == "unreadable: Is a directory"
    # the embedder reads again, later: a file gone by then is an error row, not a crash
    assert _load(tmp_path, "0.jpg", embed_options()) == "unreadable: No such file or directory"


def test_unreadable_file(tmp_path):
    save(picture(1), tmp_path / "locked.jpg", format="JPEG")
    os.chmod(tmp_path / "locked.jpg", 0)
    if os.access(tmp_path / "locked.jpg", os.R_OK):
        pytest.skip("running as root: permissions do not stop reads (traps/pipe.jpg covers an unreadable entry)")
    errors = check_files(tmp_path, list_images(tmp_path), check_options()).column("error").to_pylist()
    assert errors == ["unreadable: Permission denied"]


def test_run_over_the_corpus_accounts_for_every_file(corpus, tmp_path, prefect_server, dask_address):
    root, expected = corpus
    code = main(
        [
            "run",
            f"dask.address={dask_address}",
            f"input_dir={root}",
            f"output_dir={tmp_path}",
            "run_directory=r",
            "stopping_condition.n_samples=0.5",
            "dask.shard_size=8",
            "dump_dataset=True",
        ]
    )
    assert code == 0
    run = tmp_path / "r"
    lists = {
        name: (run / "filenames" / f"{name}_filenames.txt").read_text().splitlines()
        for name in ("corrupt", "duplicate", "removed", "sampled")
    }
    escaped = {name.replace("\n", "\\n"): name for name in expected}
    listed = [escaped[line] for lines in lists.values() for line in lines]
    assert sorted(listed) == sorted(expected), "every file in exactly one list"
    corrupt = json.loads((run / "data" / "corruptness_check_information.json").read_text())["corrupt_samples"]
    assert set(corrupt) == {name for name, reason in expected.items() if reason is not None}
    assert sorted(map(escaped.get, lists["sampled"] + lists["removed"] + lists["duplicate"])) == sorted(
        name for name, reason in expected.items() if reason is None
    )
    dumped = {p.relative_to(run / "data" / "sampled").as_posix() for p in (run / "data" / "sampled").rglob("*.png")}
    assert len(dumped) == len(lists["sampled"])
