"""Real video files for tests, encoded with PyAV: small clips whose every frame is different and
easy to recognise, in several codecs and containers, plus broken files.

    >>> path = write_video(tmp / "clip.mp4", frames(12), codec="mpeg4")
"""

from __future__ import annotations

import struct
from pathlib import Path

import av
import numpy as np

# (container extension, codec): the combinations the tests cover when the encoder is installed.
FORMATS = (("mp4", "mpeg4"), ("avi", "mpeg4"), ("mkv", "libx264"), ("webm", "libvpx"), ("mpeg", "mpeg1video"))


def has_encoder(codec: str) -> bool:
    try:
        av.codec.Codec(codec, "w")
    except Exception:
        return False
    return True


def frame(seed: int, size: tuple[int, int] = (64, 48)) -> np.ndarray:
    """An RGB frame (height, width, 3): a smooth colour field that differs clearly per seed."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [
        127 + 110 * np.sin(rng.uniform(0.03, 0.2) * x + rng.uniform(0.03, 0.2) * y + rng.uniform(0, 6.3))
        for _ in range(3)
    ]
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


def frames(n: int, size: tuple[int, int] = (64, 48), first_seed: int = 0) -> list[np.ndarray]:
    return [frame(first_seed + i, size) for i in range(n)]


def write_video(
    path: Path,
    images: list[np.ndarray],
    codec: str = "mpeg4",
    fps: int = 25,
    gop: int = 5,
    options: dict[str, str] | None = None,
    pts: list[int] | None = None,
    size: tuple[int, int] = (64, 48),
) -> Path:
    """Encode RGB frames into `path` (the container follows the extension); a short GOP makes
    seeking inside the clip meaningful. `pts` (in 1/fps units) makes the frame rate variable; no
    images makes a file with a video stream of `size` and no frames."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = images[0].shape[:2] if images else size[::-1]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.gop_size = gop
        # High bit rates keep the decoded frames close to the source, so tests can compare pixels.
        stream.bit_rate = 4_000_000
        stream.options = {"bf": "0", **(options or {})}
        container.start_encoding()  # the header, also when there are no frames
        for i, image in enumerate(images):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts is not None:
                frame.pts = pts[i]
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def rotated(path: Path, images: list[np.ndarray], **options) -> Path:
    """An MP4 whose track carries a 90-degree display rotation (as phones write), set in the track
    header's matrix: the muxer no longer takes a 'rotate' tag."""
    write_video(path, images, **options)
    identity = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    quarter_turn = struct.pack(">9I", 0, 0x10000, 0, 0xFFFF0000, 0, 0, 0, 0, 0x40000000)
    data = path.read_bytes()
    at = data.rindex(identity)  # the movie header's matrix comes first, the track header's last
    path.write_bytes(data[:at] + quarter_turn + data[at + len(identity) :])
    return path


def audio_only(path: Path, seconds: float = 0.5, rate: int = 8000) -> Path:
    """A container (by extension) with one audio stream and no video: a sine tone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate)
        tone = np.sin(np.arange(int(seconds * rate), dtype=np.float32) * 0.2)[None, :]
        for start in range(0, tone.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(tone[:, start : start + 1024]), format="fltp", layout="mono"
            )
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def truncated(path: Path, images: list[np.ndarray], keep: float = 0.5, **options) -> Path:
    """A video cut off after `keep` of its bytes, as an interrupted copy leaves it."""
    write_video(path, images, **options)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def garbled(
    path: Path, images: list[np.ndarray], at: float = 0.5, length: int = 2000, seed: int = 0, **options
) -> Path:
    """A video with `length` random bytes written over the middle, as a bad disk sector leaves it."""
    write_video(path, images, **options)
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start : start + length] = np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path
