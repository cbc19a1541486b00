"""Throughput of a cold `thresher run` against the machine's own ceiling, measured in one run.

Makes N ImageNet-size JPEGs (500x375, quality 90) from the example photos (random crops, flips
and colour shifts, so none is a duplicate), then measures:

- the ceiling: a full decode of every file on all cores (one process per core, `open_image`, as
  the check decodes), and the default model (EfficientNet-Lite0 at input_size 64, in Thresher's
  batches of 32 or a script's of 16) on all cores (one single-threaded process per core, as the
  local cluster runs). The per-image work a run must do is one decode and one forward pass, so its
  ceiling is 1 / (1 / decode rate + 1 / model rate); the model both as Thresher runs it (tasks.backbones:
  batch norms fused, channels-last) and plainly, as a user's script would;
- the README's example run, cold, against a minimal script that imports torch, builds the model and
  embeds the same images (each a new process);
- a cold `thresher run` with default settings (a new process, an empty cache and output folder)
  by this checkout and, with --baseline, by another checkout (its own .venv), alternately, in
  rounds (--repeat), the ceiling measured again at the start of each round;
  per run: the wall time, the time until its first console line, the console's line count,
  report.json's stage rates, the report's own time, the check + embed rate against the ceiling,
  and the whole run's images/s. The Prefect server is whatever a user's run gets (PREFECT_API_URL
  is unset).

    uv run python -m benchmarks.throughput --n 4000 --baseline /work/base

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[1]
EXAMPLES = HERE / "examples" / "images"
SIZE = (500, 375)


def make_photo(args: tuple[Path, Path, int]) -> None:
    from PIL import Image, ImageOps

    source, out, seed = args
    rng = np.random.default_rng(seed)
    image = Image.open(source).convert("RGB")
    width, height = image.size
    scale = rng.uniform(0.6, 1.0)
    w, h = int(width * scale), int(height * scale)
    x, y = rng.integers(0, width - w + 1), rng.integers(0, height - h + 1)
    image = image.crop((x, y, x + w, y + h)).resize(SIZE, Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    shifted = np.asarray(image, np.float32) * rng.uniform(0.8, 1.2, size=3) + rng.normal(0, 2, (SIZE[1], SIZE[0], 3))
    Image.fromarray(np.clip(shifted, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)


def decodes(path: Path) -> bool:
    from PIL import Image

    try:
        Image.open(path).load()
    except OSError:
        return False
    return True


def make_photos(root: Path, n: int, cores: int) -> list[Path]:
    sources = [path for path in sorted(EXAMPLES.rglob("*.jpg")) if decodes(path)]  # not the truncated one
    jobs = [(sources[i % len(sources)], root / f"{i // 1000:03d}" / f"photo_{i:06d}.jpg", i) for i in range(n)]
    for folder in {out.parent for _, out, _ in jobs}:
        folder.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(cores) as pool:
        list(pool.map(make_photo, jobs, chunksize=64))
    return [out for _, out, _ in jobs]


def decode_files(paths: list[Path]) -> int:
    from tasks.decoding import open_image

    for path in paths:
        open_image(path.read_bytes(), 10**9)
    return len(paths)


_MODEL = None


def load_model() -> None:
    """The model as Thresher runs it (tasks.backbones: batch norms fused, channels-last)."""
    global _MODEL
    import torch

    from tasks.backbones import load_backbone

    torch.set_num_threads(1)
    _MODEL = load_backbone("efficientnet-lite0", 32, None, 1, "cpu")


def load_plain_model() -> None:
    """The default model as a user's script runs it: built, in eval mode, nothing else."""
    global _MODEL
    import torch

    from tasks.backbones import build_backbone

    torch.set_num_threads(1)
    _MODEL = build_backbone("efficientnet-lite0", 32, 1).eval()


def embed_random(n: int) -> int:
    from tasks.embedding import embed_inputs
    from tests.options import embed_options

    rng = np.random.default_rng(n)
    inputs = (rng.integers(0, 256, (3, 64, 64), dtype=np.uint8) for _ in range(n))
    embed_inputs(inputs, _MODEL, embed_options())
    return n


def embed_random_plainly(n: int) -> int:
    """As embed_random, the way a user's script embeds: float32 NCHW batches of 16, inference mode."""
    import torch

    from tasks.backbones import IMAGENET_MEAN, IMAGENET_STD

    rng = np.random.default_rng(n)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for start in range(0, n, 16):
        batch = torch.from_numpy(rng.integers(0, 256, (min(16, n - start), 3, 64, 64), dtype=np.uint8))
        with torch.inference_mode():
            _MODEL((batch.float() / 255 - mean) / std)
    return n


def rate_on_all_cores(work, shares: list, warmup: object, cores: int, initializer=None) -> float:
    """Items per second of `work` over `shares`, one process per core, each warmed up first."""
    with ProcessPoolExecutor(cores, initializer=initializer) as pool:
        list(pool.map(work, [warmup] * cores))
        start = time.perf_counter()
        done = sum(pool.map(work, shares))
        return done / (time.perf_counter() - start)


def ceiling(paths: list[Path], cores: int) -> dict[str, float]:
    """The ceiling with the model as Thresher runs it, and with the plain default model (the
    issue's definition: its settings are among what the run may tune to come closer)."""
    decode = rate_on_all_cores(decode_files, [paths[i::cores] for i in range(cores)], paths[:2], cores)
    shares = [len(paths) // cores] * cores
    model = rate_on_all_cores(embed_random, shares, 32, cores, initializer=load_model)
    plain = rate_on_all_cores(embed_random_plainly, shares, 32, cores, initializer=load_plain_model)
    return {
        "decode": decode,
        "model": model,
        "plain_model": plain,
        "ceiling": 1 / (1 / decode + 1 / model),
        "plain_ceiling": 1 / (1 / decode + 1 / plain),
    }


def cold_run(code: Path, input_dir: Path, work: Path, name: str) -> dict:
    """A cold `thresher run` of the checkout `code`: its wall time, first console line and lines."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    out, shared = work / f"out-{name}", work / f"shared-{name}"
    shared.mkdir(parents=True)
    command = [
        str(code / ".venv" / "bin" / "thresher"),
        "run",
        f"input_dir={input_dir}",
        f"output_dir={out}",
        f"shared_dir={shared}",
        "run_directory=run",
        "stopping_condition.n_samples=0.3",
    ]
    start = time.perf_counter()
    # Bytes, not text: text mode would count each redraw of the progress line (a carriage return) as a line.
    process = subprocess.Popen(command, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
    first, lines = None, 0
    for _ in process.stdout:
        first = first or time.perf_counter() - start
        lines += 1
    code_ = process.wait()
    wall = time.perf_counter() - start
    assert code_ == 0, f"{name}: thresher run exited {code_}"
    path = out / "run" / "report.json"
    report = json.loads(path.read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    # The job's end is the report's start; report.json is the report's last file.
    report_seconds = path.stat().st_mtime - datetime.fromisoformat(report["job"]["finished"]).timestamp()
    return {"wall": wall, "first_line": first, "lines": lines, "stages": stages, "report": report_seconds}


MINIMAL = """
import sys
from pathlib import Path
import numpy as np, torch
from PIL import Image
from tasks.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone
model = build_backbone("efficientnet-lite0", 32, 1).eval()
paths = sorted(p for p in Path(sys.argv[1]).rglob("*") if p.is_file())
images = []
for path in paths:
    try:
        images.append(np.asarray(Image.open(path).convert("RGB").resize((64, 64)), np.float32) / 255)
    except OSError:
        pass  # the truncated example
x = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
with torch.inference_mode():
    model(x / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
"""


def readme_example(code: Path, work: Path) -> dict:
    """The README's example run, cold, against a minimal script that imports torch, builds the model
    and embeds the same images, each in a new process."""
    start = time.perf_counter()
    subprocess.run([str(code / ".venv" / "bin" / "python"), "-c", MINIMAL, str(EXAMPLES)], cwd=code, check=True)
    minimal = time.perf_counter() - start
    return {"minimal": minimal, "run": cold_run(code, EXAMPLES, work, "readme")}


def per_image_rate(run: dict, n: int) -> float:
    """Images per second of the per-image work: the check and the embedding, one stage or two."""
    stages = run["stages"]
    seconds = sum(stages[s]["seconds"] for s in ("check", "embed", "check_and_embed") if s in stages)
    return n / seconds


def show(name: str, run: dict, n: int, top: dict[str, float]) -> None:
    rate = per_image_rate(run, n)
    print(f"\n{name}: {run['wall']:.1f} s cold, {n / run['wall']:.1f} images/s over the whole run")
    print(f"  first console line after {run['first_line']:.1f} s; {run['lines']} console lines")
    for stage, row in run["stages"].items():
        print(f"  {stage:<16} {row['seconds']:8.2f} s  {row.get('items_per_second') or 0:8.1f} items/s")
    print(f"  {'report':<16} {run['report']:8.2f} s")
    print(f"  stages' sum {sum(r['seconds'] for r in run['stages'].values()):.1f} s; the rest (start, report, end)")
    print(
        f"  check + embed: {rate:.1f} images/s = {rate / top['ceiling']:.2f} x the ceiling, "
        f"{rate / top['plain_ceiling']:.2f} x the plain model's"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--baseline", type=Path, help="a checkout of earlier code, with its .venv")
    parser.add_argument("--repeat", type=int, default=1, help="cold runs of each checkout, alternating")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        paths = make_photos(work / "photos", args.n, cores)
        print(f"{args.n} photos {SIZE[0]}x{SIZE[1]} made in {time.perf_counter() - start:.0f} s; {cores} cores")
        example = readme_example(HERE, work)
        print(
            f"README example: {example['run']['wall']:.1f} s cold, {example['run']['lines']} console lines; "
            f"a minimal script (import torch, build the model, embed the {len(list(EXAMPLES.rglob('*.*')))} images) "
            f"{example['minimal']:.1f} s: {example['run']['wall'] / example['minimal']:.2f}x"
        )
        checkouts = {"this": HERE, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
        runs: dict[str, list[dict]] = {name: [] for name in checkouts}
        tops = []
        for i in range(args.repeat):
            # Measured before each round: this machine's speed drifts by a third within minutes, so
            # each run is set against the ceiling measured next to it.
            tops.append(ceiling(paths, cores))
            for name, code in checkouts.items():
                runs[name].append(cold_run(code, work / "photos", work, f"{name}-{i}"))
        for i, top in enumerate(tops):
            print(
                f"\nround {i + 1}: ceiling: full decode {top['decode']:.0f} images/s, model {top['model']:.0f} "
                f"images/s, both {top['ceiling']:.0f} images/s; with the plain model {top['plain_model']:.0f} "
                f"and {top['plain_ceiling']:.0f} images/s"
            )
            for name, done in runs.items():
                show(name, done[i], args.n, top)
        if args.baseline:
            this = min(r["wall"] for r in runs["this"])
            base = min(r["wall"] for r in runs["baseline"])
            print(f"\nwhole cold run: baseline / this = {base:.1f} / {this:.1f} s = {base / this:.2f}x faster")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
