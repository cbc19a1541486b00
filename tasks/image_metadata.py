"""The Lightly Worker's computed image metadata (`lightly.*` keys), from pixels already decoded.

The check stage decodes every image and video frame anyway (tasks/decoding.py,
tasks/video/quality.py); it adds these columns to each sample's row, and they reach
samples.parquet (tasks/dedup.py). A corrupt sample has nulls, and so has an image that is not
decoded (`enable_corruptness_check=false` or `corruptness_check.full_decode=false`; video frames
are always decoded).

Lightly's documentation names the keys but does not give formulas, so the definitions are
standard ones. All are computed on the decoded RGB picture sampled at every STRIDE-th pixel in
each direction (point sampling, no averaging), and grey is Pillow's ITU-R 601-2 luma
(L = 0.299 R + 0.587 G + 0.114 B, 8 bits):

- `sharpness`: variance of the 4-neighbour Laplacian of the sampled grey picture (its interior).
  The Laplacian spans STRIDE pixels of the original, so the number depends on STRIDE; point
  sampling, unlike a box average, keeps fine detail and noise (it folds into the sampled
  picture), so a blurred copy still scores clearly lower. Images and video frames are sampled
  the same way, so their values compare.
- `snr`: mean / standard deviation of grey; +inf for a flat picture that is not black, 0 for an
  all-black one.
- `contrast`: RMS contrast, the standard deviation of grey / 255 (0 for a flat picture, at most 0.5).
- `mean_red`, `mean_green`, `mean_blue`: the mean of each channel, in 0..255.

`lightly.width`, `lightly.height` and `lightly.sizeInBytes` are the check's `width`, `height`
and `size` (of a video frame: its video file's size). Sampling is what keeps this cheap (a
quarter of the pixels; see benchmarks/check.py): on 640x480 JPEGs it adds about a tenth to the
check's time.

    >>> metadata = pixel_metadata(sampled(Image.new("RGB", (64, 48), (255, 0, 0))))
    >>> metadata["mean_red"], metadata["contrast"]
    (255.0, 0.0)
    >>> sample_metadata(samples, "lightly.sharpness")  # doctest: +SKIP
    array([412.3, nan, 97.1])
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

# The metrics see every STRIDE-th pixel of every STRIDE-th row.
STRIDE = 2

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


def sampled(image: Image.Image) -> Image.Image:
    """The RGB image at every STRIDE-th pixel, what pixel_metadata measures."""
    return image.resize(sampled_size(*image.size), Image.Resampling.NEAREST)


def laplacian_variance(grey: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over the interior of a uint8 picture (0 when it has none)."""
    if grey.shape[0] < 3 or grey.shape[1] < 3:
        return 0.0
    g = grey.astype(np.int16)  # the Laplacian of 8-bit values lies in -1020..1020
    laplacian = g[1:-1, 1:-1] * 4
    laplacian -= g[:-2, 1:-1]
    laplacian -= g[2:, 1:-1]
    laplacian -= g[1:-1, :-2]
    laplacian -= g[1:-1, 2:]
    # Exact in float64 (sums of integers below 2**53); einsum, not np.dot, which would call BLAS
    # and wake its threads, slowing the decoding threads more than it saves.
    values = laplacian.ravel().astype(np.float64)
    n = values.size
    mean = float(values.sum()) / n
    return float(np.einsum("i,i->", values, values)) / n - mean * mean


def pixel_metadata(rgb: Image.Image) -> dict[str, float]:
    """METRICS_SCHEMA's fields of an already sampled RGB image (see the module doc)."""
    grey = rgb.convert("L")
    # Means and variance from Pillow's histograms (one pass in C); numpy sums, not matrix
    # products, which would call BLAS and wake its threads beside the decoding threads.
    counts = np.array(rgb.histogram() + grey.histogram(), dtype=np.float64).reshape(4, 256)
    n = counts[0].sum()
    red, green, blue, mean = (counts * _LEVELS).sum(axis=1) / n
    std = float(np.sqrt(max((counts[3] * _LEVELS * _LEVELS).sum() / n - mean * mean, 0.0)))
    return {
        "sharpness": laplacian_variance(np.asarray(grey)),
        "snr": mean / std if std > 0 else (np.inf if mean > 0 else 0.0),
        "mean_red": float(red),
        "mean_green": float(green),
        "mean_blue": float(blue),
        "contrast": std / 255.0,
    }


def sample_metadata(samples: pa.Table, key: str) -> np.ndarray:
    """One float per row of samples.parquet for a `lightly.*` key; NaN where it has none (corrupt
    or undecoded samples)."""
    if key not in LIGHTLY_METADATA:
        raise ValueError(f"Unknown metadata key {key!r}: the computed metadata keys are {', '.join(LIGHTLY_METADATA)}.")
    column = pc.cast(samples.column(LIGHTLY_METADATA[key]), pa.float64())
    return column.to_numpy().astype(np.float64, copy=False)
