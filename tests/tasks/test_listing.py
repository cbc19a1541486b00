import os
from pathlib import PurePosixPath

from tasks import listing
from tasks.listing import (
    NO_EXTENSION,
    InputFile,
    assign_labels,
    is_video,
    list_images,
    list_input,
    read_relevant_filenames,
    suffix,
)
from tests.images import camera_and_phone_files, picture, save


def test_flat_folder_is_label_zero_and_sorted(tmp_path):
    for name in ["b.jpg", "a.png", "notes.txt"]:
        save(picture(1), tmp_path / name) if name != "notes.txt" else (tmp_path / name).write_text("x")
    files = list_images(tmp_path)
    assert [(f.filename, f.label) for f in files] == [("a.png", 0), ("b.jpg", 0)]
    assert files[0].size == (tmp_path / "a.png").stat().st_size


def test_subfolders_become_sorted_label_indices():
    assert assign_labels(["dogs/a.jpg", "cats/b.jpg", "cats/c.jpg"]) == [1, 0, 0]
    assert assign_labels(["root.jpg", "cats/b.jpg"]) == [0, 1]


def test_symlinks_leaving_input_dir_are_not_followed(tmp_path):
    inside, outside = tmp_path / "in", tmp_path / "out"
    save(picture(1), inside / "a.jpg")
    save(picture(2), outside / "secret.jpg")
    os.symlink(outside / "secret.jpg", inside / "link_out.jpg")
    os.symlink(inside / "a.jpg", inside / "link_in.jpg")
    os.symlink(inside, inside / "loop")  # a directory loop must not hang the walk
    assert [f.filename for f in list_images(inside)] == ["a.jpg", "link_in.jpg"]


def test_relevant_filenames_restrict_the_listing(tmp_path):
    for name in ["a.jpg", "b.jpg", "sub/c.jpg"]:
        save(picture(1), tmp_path / "in" / name)
    listing = tmp_path / "relevant.txt"
    listing.write_text("# wanted\n./sub/c.jpg\n\na.jpg\nmissing.jpg\n")
    wanted = read_relevant_filenames(listing)
    assert wanted == ["sub/c.jpg", "a.jpg", "missing.jpg"]
    assert [f.filename for f in list_images(tmp_path / "in", wanted)] == ["a.jpg", "sub/c.jpg"]


def test_names_that_are_not_utf8_are_skipped_with_a_warning(tmp_path, caplog):
    save(picture(1), tmp_path / "good.jpg")
    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg"), "wb") as handle:  # Latin-1 bytes
        handle.write((tmp_path / "good.jpg").read_bytes())
    assert [f.filename for f in list_images(tmp_path)] == ["good.jpg"]
    assert "caf\\udce9.jpg" in caplog.text and "not valid UTF-8" in caplog.text


def test_a_folder_lists_its_files_then_its_subfolders_in_name_order(tmp_path):
    # The order of a top-down walk, as earlier releases listed: shard boundaries and cache keys follow it.
    for name in ["b.jpg", "a/z.jpg", "a/c/y.jpg", "a/x.jpg", "c.png"]:
        save(picture(1), tmp_path / name)
    os.symlink(tmp_path / "a", tmp_path / "alias")  # a folder symlink is not descended
    assert [f.filename for f in list_images(tmp_path)] == ["b.jpg", "c.png", "a/x.jpg", "a/z.jpg", "a/c/y.jpg"]


def test_extensions_are_read_as_a_posix_path_reads_them():
    names = ["a/b.JPG", "a/.jpg", "a/..jpg", "b.", "a.b/c", "x.tar.gz", "noext", "...", "dir.d/v.MP4"]
    assert [suffix(name) for name in names] == [PurePosixPath(name).suffix.lower() for name in names]
    assert [is_video(name) for name in names] == [False] * 8 + [True]


def test_an_unreadable_subfolder_is_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    for name in ["a.jpg", "locked/b.jpg", "open/c.jpg"]:
        save(picture(1), tmp_path / name)
    scandir = os.scandir

    def refuse_locked(path):  # root may read any folder, so the refusal is injected
        if os.path.basename(path) == "locked":
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(listing.os, "scandir", refuse_locked)
    assert [f.filename for f in list_images(tmp_path)] == ["a.jpg", "open/c.jpg"]
    assert "Skipping the folder" in caplog.text and "locked" in caplog.text and "Permission denied" in caplog.text


def test_every_format_pillow_opens_is_listed_and_other_files_are_counted_by_extension(tmp_path):
    camera_and_phone_files(tmp_path)
    for name in ["notes.txt", "sub/more.TXT", "meta.json", "README", "scan.pdf", "clip.mp4"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    listed = list_input(tmp_path)
    assert [f.filename for f in listed.files] == [
        "IMG_0001.HEIC",
        "camera.mpo",
        "clip.mp4",
        "photo.avif",
        "photo.png",
        "turned.heic",
    ]
    # Pillow only writes PDF; a name without an extension is counted under NO_EXTENSION.
    assert listed.not_images == {NO_EXTENSION: 1, ".json": 1, ".pdf": 1, ".txt": 2}


def test_dask_names_tasks_by_the_files_identities():
    from dask.tokenize import tokenize

    from tasks.video.frames import FrameRange

    file = InputFile("a/b.jpg", 1, 100, "7.0")
    assert tokenize([file]) == tokenize([InputFile("a/b.jpg", 1, 100, "7.0")])
    changed = [
        InputFile("a/c.jpg", 1, 100, "7.0"),
        InputFile("a/b.jpg", 2, 100, "7.0"),
        InputFile("a/b.jpg", 1, 1, "7.0"),
    ]
    assert len({tokenize([f]) for f in [file, *changed, InputFile("a/b.jpg", 1, 100, "8.0")]}) == 5
    frames = FrameRange(file, 10, (0, 1), (0, 512), 512)
    assert tokenize(frames) == tokenize(FrameRange(file, 10, (0, 1), (0, 512), 512))
    assert tokenize(frames) != tokenize(FrameRange(file, 10, (0, 2), (0, 1024), 512))
