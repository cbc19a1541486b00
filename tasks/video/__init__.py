"""Video input: every frame of a video is a sample.

The pipeline never holds a video in memory. `probe.py` reads only the container's packets (no
decoding) to learn each frame's presentation timestamp (pts) and the keyframes; the flow then cuts
videos into `FrameRange`s that start at keyframes (`tasks/sharding.py`), so many workers decode one
long video in parallel and each seeks straight to its range. `frames.py` streams one range with
PyAV's threaded decoder and gives every wanted frame exactly once; callers convert each frame as
it comes out (hash and corruption score in `quality.py`, thumbnail for the embedder, image).
`sequences.py` maps frame names back to their videos and times, for sequence selection and the
report's timelines.
"""
