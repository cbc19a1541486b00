from PIL import Image

from tasks.dumping import dump_names, dump_shard, target_size
from tasks.listing import InputFile
from tests.images import picture, save


def test_target_sizes():
    assert target_size((200, 100), -1) == (200, 100)
    assert target_size((200, 100), 50) == (100, 50)
    assert target_size((200, 100), (30, 40)) == (40, 30)


def test_names_change_extension_without_collisions():
    names = dump_names(["a.jpg", "a.png", "s/b.jpeg"], "png")
    assert names == {"a.jpg": "a.png", "a.png": "a_png.png", "s/b.jpeg": "s/b.png"}


def test_dump_reencodes_and_resizes(tmp_path):
    source = save(picture(1, (90, 60)), tmp_path / "in.png")
    dump_shard.fn(
        source.parent,
        [InputFile(source.name, 0, 1, "0.0")],
        {"in.png": "in.jpg"},
        tmp_path / "out",
        30,
        "jpg",
        max_pixels=10**6,
    )
    with Image.open(tmp_path / "out" / "in.jpg") as out:
        assert out.format == "JPEG" and out.size == (45, 30)


def test_a_selected_file_deleted_before_the_dump_is_reported_and_the_rest_dumped(tmp_path):
    save(picture(1, (40, 30)), tmp_path / "in" / "kept.png")
    save(picture(2, (40, 30)), tmp_path / "in" / "gone.png").unlink()
    files = [InputFile(name, 0, 1, "0.0") for name in ("gone.png", "kept.png")]
    failed = dump_shard.fn(
        tmp_path / "in", files, {"gone.png": "gone.png", "kept.png": "kept.png"}, tmp_path / "out", -1, "png", 10**6
    )
    assert list(failed) == ["gone.png"] and "No such file" in failed["gone.png"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["kept.png"]
