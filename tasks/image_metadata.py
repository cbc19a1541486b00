"""The Lightly Worker's computed image metadata (`lightly.*` keys), from pixels already decoded.

The check stage decodes every image and video frame anyway (tasks/decoding.py,
tasks/video/quality.py); it adds these columns to each sample's row, and they reach
samples.parquet (tasks/dedup.py). A corrupt sample has nulls, and so has an image that is not
decoded (`enable_corruptness_check=false` or `corruptness_check.full_decode=false`; video frames
are always decoded).

Lightly's documentation names the keys but gives no formulas, so the definitions are standard
ones, on grey = Pillow's ITU-R 601-2 luma (L = 0.299 R + 0.587 G + 0.114 B, 8 bits; a video
frame's is its luma plane as FFmpeg converts it to gray8):

- `sharpness`: variance of the 4-neighbour Laplacian of the full-resolution grey picture
  (4 p - its upper, lower, left and right neighbours, over the interior).
- `snr`: mean / standard deviation of grey; +inf for a flat picture that is not black, 0 for an
  all-black one.
- `contrast`: RMS contrast, the standard deviation of grey / 255 (0 for a flat picture, at most 0.5).
- `mean_red`, `mean_green`, `mean_blue`: the mean of each channel, in 0..255.

Cost: every statistic is estimated from the pixels of every STRIDE-th row and column, not all
of them (the Laplacian still takes its neighbours at full resolution, so sharpness keeps its
meaning: downscaling first would measure a coarser scale, where blur barely shows). Images and
video frames are sampled the same way. What remains is one grey conversion at full resolution
(about 0.2 ms of the 0.45 ms this takes on a 640x480 image, to a check of about 3.5 ms:
benchmarks/check.py measures +13 to 19%; on the tiny example images, 160 pixels wide, the fixed
cost of about 0.2 ms makes it +40%).

`lightly.width`, `lightly.height` and `lightly.sizeInBytes` are the check's `width`, `height`
and `size` (of a video frame: its video file's size).

    >>> image_metadata(Image.new("RGB", (64, 48), (255, 0, 0)))["mean_red"]
    255.0
    >>> sample_metadata(samples, "lightly.sharpness")  # doctest: +SKIP
    array([412.3, nan, 97.1])
"""

from __future__ import annotations

import av
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

# The statistics see every STRIDE-th pixel of every STRIDE-th row.
STRIDE = 4

METRICS_SCHEMA = pa.schema(
    [
        ("sharpness", pa.float32()),
        ("snr", pa.float32()),
        ("mean_red", pa.float32()),
        ("mean_green", pa.float32()),
        ("mean_blue", pa.float32()),
        ("contrast", pa.float32()),
    ]
)

# The Worker's metadata keys (METADATA selection inputs) -> samples.parquet columns.
LIGHTLY_METADATA: dict[str, str] = {
    "lightly.sharpness": "sharpness",
    "lightly.snr": "snr",
    "lightly.sizeInBytes": "size",
    "lightly.width": "width",
    "lightly.height": "height",
    "lightly.meanRed": "mean_red",
    "lightly.meanGreen": "mean_green",
    "lightly.meanBlue": "mean_blue",
    "lightly.contrast": "contrast",
}

_LEVELS = np.arange(256, dtype=np.float64)


def sampled_size(width: int, height: int) -> tuple[int, int]:
    return max(1, width // STRIDE), max(1, height // STRIDE)


def laplacian_variance(grey: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of a uint8 picture, at every STRIDE-th interior pixel
    of every STRIDE-th row (0 when it has no interior). Strided views: nothing is copied at full
    resolution."""
    if grey.shape[0] < 3 or grey.shape[1] < 3:
        return 0.0
    centre, before, after = np.s_[1:-1:STRIDE], np.s_[0:-2:STRIDE], np.s_[2::STRIDE]
    laplacian = grey[centre, centre].astype(np.int16) * 4  # within -1020..1020
    for neighbour in (grey[before, centre], grey[after, centre], grey[centre, before], grey[centre, after]):
        laplacian -= neighbour
    return _mean_and_variance(laplacian)[1]


def _mean_and_variance(values: np.ndarray) -> tuple[float, float]:
    # Exact in float64 (sums of integers below 2**53); einsum, not np.dot, which would call BLAS
    # and wake its threads beside the decoding threads.
    flat = values.ravel().astype(np.float64)
    mean = float(flat.sum()) / flat.size
    return mean, max(float(np.einsum("i,i->", flat, flat)) / flat.size - mean * mean, 0.0)


def pixel_metadata(grey: np.ndarray, rgb: Image.Image) -> dict[str, float]:
    """METRICS_SCHEMA's fields from the full-resolution grey picture and the RGB one already
    sampled at every STRIDE-th pixel (see the module doc)."""
    counts = np.array(rgb.histogram(), dtype=np.float64).reshape(3, 256)
    red, green, blue = (counts * _LEVELS).sum(axis=1) / counts[0].sum()
    mean, variance = _mean_and_variance(grey[::STRIDE, ::STRIDE])
    std = float(np.sqrt(variance))
    return {
        "sharpness": laplacian_variance(grey),
        "snr": mean / std if std > 0 else (np.inf if mean > 0 else 0.0),
        "mean_red": float(red),
        "mean_green": float(green),
        "mean_blue": float(blue),
        "contrast": std / 255.0,
    }


def image_metadata(image: Image.Image) -> dict[str, float]:
    """METRICS_SCHEMA's fields of a decoded RGB image."""
    rgb = image.resize(sampled_size(*image.size), Image.Resampling.NEAREST)
    return pixel_metadata(np.asarray(image.convert("L")), rgb)


def frame_metadata(frame: av.VideoFrame) -> dict[str, float]:
    """METRICS_SCHEMA's fields of a decoded video frame, measured like an image's."""
    width, height = sampled_size(frame.width, frame.height)
    rgb = frame.reformat(width=width, height=height, format="rgb24", interpolation="POINT").to_image()
    return pixel_metadata(frame.to_ndarray(format="gray"), rgb)


def sample_metadata(samples: pa.Table, key: str) -> np.ndarray:
    """One float per row of samples.parquet for a `lightly.*` key; NaN where it has none (corrupt
    or undecoded samples)."""
    if key not in LIGHTLY_METADATA:
        raise ValueError(f"Unknown metadata key {key!r}: the computed metadata keys are {', '.join(LIGHTLY_METADATA)}.")
    column = pc.cast(samples.column(LIGHTLY_METADATA[key]), pa.float64())
    return column.to_numpy().astype(np.float64, copy=False)
