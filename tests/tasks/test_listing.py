import os

from tasks.listing import assign_labels, list_images, read_relevant_filenames
from tests.images import picture, save


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
