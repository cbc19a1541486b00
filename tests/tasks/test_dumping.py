from PIL import Image

from tasks.dumping import dump_image, dump_names, target_size
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
    dump_image(source, tmp_path / "out" / "in.jpg", 30, "jpg", max_pixels=10**6)
    with Image.open(tmp_path / "out" / "in.jpg") as out:
        assert out.format == "JPEG" and out.size == (45, 30)
