"""Frame quality: the check of one decoded frame (pixel hash, size, corruption score, and the
image metadata of `tasks/image_metadata.py`, measured like an image's).

Corruption score of a decoded frame, in [0, 1]: 1 when the decoder flags the frame as corrupt
(it had to conceal a damaged packet); otherwise the fraction of 16x16 luma blocks whose border
to a neighbour is much sharper than their inside (`corruption_score`). Decoders hide lost data
by copying blocks from elsewhere, and errors propagate to the following frames through motion
compensation without any flag; both leave a grid of hard block edges that natural pictures and
ordinary compression do not have (clean frames score below 0.08, damaged ones 0.1 to 0.6 in the
tests). `corruptness_check.corruption_threshold` (default 0.1) applies to this score.
"""

from __future__ import annotations

import av
import numpy as np
import xxhash

from tasks.image_metadata import frame_metadata

MACROBLOCK = 16
# A block edge counts as broken when it is this many times sharper than the block's inside, and
# at least EDGE_FLOOR grey levels sharper (flat blocks have tiny insides).
EDGE_RATIO = 3.0
EDGE_FLOOR = 8.0


def corruption_score(luma: np.ndarray) -> float:
    """Fraction of 16x16 blocks whose edges are much sharper than their inside (see the module doc)."""
    h, w = (luma.shape[0] // MACROBLOCK) * MACROBLOCK, (luma.shape[1] // MACROBLOCK) * MACROBLOCK
    rows, cols = h // MACROBLOCK, w // MACROBLOCK
    if rows < 2 or cols < 2:
        return 0.0
    y = luma[:h, :w].astype(np.float32)
    dx = np.abs(np.diff(y, axis=1))  # dx[:, x] is the step between columns x and x + 1
    dy = np.abs(np.diff(y, axis=0))
    on_edge = np.arange(w - 1) % MACROBLOCK == MACROBLOCK - 1
    inside_x = np.where(on_edge[None, :], np.nan, dx)
    inside_y = np.where(on_edge[: h - 1, None], np.nan, dy)
    inside = (
        np.nanmean(
            np.pad(inside_x, ((0, 0), (0, 1)), constant_values=np.nan).reshape(rows, MACROBLOCK, cols, MACROBLOCK),
            axis=(1, 3),
        )
        + np.nanmean(
            np.pad(inside_y, ((0, 1), (0, 0)), constant_values=np.nan).reshape(rows, MACROBLOCK, cols, MACROBLOCK),
            axis=(1, 3),
        )
    ) / 2
    vertical = dx[:, on_edge].reshape(rows, MACROBLOCK, cols - 1).mean(axis=1)  # between block columns
    horizontal = dy[on_edge[: h - 1], :].reshape(rows - 1, cols, MACROBLOCK).mean(axis=2)
    edges = np.zeros((rows, cols), np.float32)
    count = np.zeros((rows, cols), np.float32)
    for view, values in (
        (np.s_[:, 1:], vertical),
        (np.s_[:, :-1], vertical),
        (np.s_[1:, :], horizontal),
        (np.s_[:-1, :], horizontal),
    ):
        edges[view] += values
        count[view] += 1
    edges /= count
    return float((edges > np.maximum(EDGE_RATIO * inside, inside + EDGE_FLOOR)).mean())


def frame_score(frame: av.VideoFrame, luma: np.ndarray) -> float:
    return 1.0 if frame.is_corrupt else corruption_score(luma)


def _pixels(frame: av.VideoFrame) -> tuple[np.ndarray, np.ndarray]:
    """(all pixels for hashing, the luma plane); 4:2:0 YUV is what nearly every video holds, so
    this is usually a copy without conversion."""
    if frame.width % 2 == 0 and frame.height % 2 == 0:
        yuv = frame.to_ndarray(format="yuv420p")
        return yuv, yuv[: frame.height]
    rgb = frame.to_ndarray(format="rgb24")
    return rgb, frame.to_ndarray(format="gray")


def check_frame(frame: av.VideoFrame, threshold: float | None) -> dict:
    """What the check finds in one decoded frame (decoding.check_row's fields): the hash of its
    decoded pixels (so identical frames, e.g. a frozen camera, are exact duplicates), its size,
    and why it is corrupt, if it is, or else its image metadata. Without a threshold only frames
    that fail to decode are corrupt."""
    pixels, luma = _pixels(frame)
    found = {
        "content_hash": xxhash.xxh3_128_hexdigest(np.ascontiguousarray(pixels)),
        "width": frame.width,
        "height": frame.height,
    }
    if threshold is not None:
        score = frame_score(frame, luma)
        if score > threshold:
            found["error"] = (
                f"corrupt frame: corruption score {score:.2f} > corruptness_check.corruption_threshold={threshold}"
            )
            return found
    return found | frame_metadata(frame)
