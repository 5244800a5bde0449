"""Caching throughput: images/s through the ``cache_activations`` stage against a pure encoder
forward on the same images, side by side in one process.

The bench writes its own data and model (nothing is downloaded): ``--images`` synthetic JPEG
photos of ``--image-px`` pixels in DTD's layout (``dtd/images/<class>/*.jpg`` listed in
``dtd/labels/test1.txt``: a folder of image files as the real datasets are), and the open_clip
architecture ``--model`` with random weights saved as ``prepare_model`` saves it.

Measured, interleaved (the order rotates every repeat, so load from other processes hits all
alike), ``--repeats`` times:

- ``forward``: the model's image encoder on the batches the stage sees, already decoded and
  preprocessed (the same tensors, pinned on a GPU): copy to the device, ``encode_image``, copy
  the embeddings back; no files, no HDF5. The least any cache must do;
- ``cache``: :func:`saeft.stages.cache.run` on all ``--images`` images (model load, image decoding and
  preprocessing, the forward, the HDF5 writes and flushes, the final rename);
- ``cache, one batch``: the same stage on the first ``--batch`` images only: its fixed cost
  (loading the model, opening the files) and the first batch;
- ``loading``: the stage's data loading alone (the DataLoader over the image files with
  ``--workers`` workers: decoding and preprocessing), the other ceiling of the stage's throughput.

The stage's throughput is the per-image cost beyond that fixed cost,
``(images - batch) / (t_cache - t_one_batch)``: what caching a dataset of any size costs per
image. Its ratio to the forward's throughput is the figure of merit (goal >= 0.9x); the end to end
ratio (fixed cost included) is printed too. Times are CPU time of this process on a CPU device
with ``--workers 0`` (blind to other processes holding the cores), else wall-clock time with
``torch.cuda.synchronize`` around each measurement.

    PYTHONPATH=. python bench/cache.py                       # ViT-B-32, 128 images, CPU
    PYTHONPATH=. python bench/cache.py --device cuda --model ViT-B-16 --images 4096 --batch 256 --workers 8
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

GOAL = 0.9
"""The stage's throughput over the forward's that the benchmark checks."""


def write_images(root: Path, count: int, width: int, height: int, seed: int = 0) -> list[str]:
    """``count`` photo-like JPEGs (smooth colour fields, shapes, sensor noise) under
    ``root/images/<class>/``; returns their paths relative to ``root/images``, in order."""
    from saeft.data.smallsets import DTD_CLASSES

    rng = np.random.default_rng(seed)
    listed = []
    for i in range(count):
        texture = DTD_CLASSES[i % len(DTD_CLASSES)]
        folder = root / "images" / texture
        folder.mkdir(parents=True, exist_ok=True)
        # A coarse random colour grid upsampled smoothly: large-scale structure like a photo's.
        coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
            r = int(rng.integers(10, max(11, min(width, height) // 3)))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        image = image.filter(ImageFilter.GaussianBlur(1.5))
        noise = rng.normal(0, 6, size=(height, width, 3))
        pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        name = f"{texture}_{i:05d}.jpg"
        Image.fromarray(pixels).save(folder / name, quality=90)
        listed.append(f"{texture}/{name}")
    return listed


def write_split(root: Path, images: Path, listed: list[str]) -> None:
    """A DTD tree at ``root`` whose test split lists ``listed`` from the shared ``images`` folder."""
    (root / "dtd" / "labels").mkdir(parents=True, exist_ok=True)
    if not (root / "dtd" / "images").exists():
        (root / "dtd" / "images").symlink_to(images.resolve(), target_is_directory=True)
    (root / "dtd" / "labels" / "test1.txt").write_text("\n".join(listed) + "\n")


def clock_of(name: str, device: str, workers: int):
    """``cpu``: this process's CPU time (valid only when all the work is in this process);
    ``wall``: elapsed time; ``auto``: cpu on a CPU device without loader workers, else wall."""
    if name == "auto":
        name = "cpu" if device == "cpu" and workers == 0 else "wall"
    return time.process_time if name == "cpu" else time.perf_counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture, random weights (default ViT-B-32)")
    parser.add_argument("--images", type=int, default=128, help="images cached per measurement (default 128)")
    parser.add_argument("--batch", type=int, default=32, help="cache.batch_size (default 32)")
    parser.add_argument("--workers", type=int, default=0, help="cache.workers: DataLoader worker processes (default 0)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each measurement (default 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1; the stage runs with as many through SAEFT_THREADS)")
    parser.add_argument("--image-px", default="500x375", help="synthetic JPEG size WxH (default 500x375, ImageNet's typical)")
    parser.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto")
    parser.add_argument("--workdir", default=None, help="folder for the images, model and caches (default: a temporary one)")
    args = parser.parse_args()
    if args.images <= args.batch:
        parser.error(f"--images ({args.images}) must exceed --batch ({args.batch}): the per-image cost is the difference")
    width, height = (int(v) for v in args.image_px.lower().split("x"))

    os.environ["SAEFT_THREADS"] = str(args.threads)  # cache.run's setup_torch reads it
    import torch

    from saeft.data.registry import get_dataset
    from saeft.nn.models import create_clip, load_clip, preprocess_for, save_clip
    from saeft.stages import cache

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = clock_of(args.clock, args.device, args.workers)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="saeft-bench-cache-"))
    try:
        started = time.perf_counter()
        torch.manual_seed(0)
        model_path = work / "model.safetensors"
        save_clip(model_path, create_clip(args.model).eval(), args.model, source=None)
        listed = write_images(work / "images", args.images, width, height)
        write_split(work / "all", work / "images" / "images", listed)
        write_split(work / "one", work / "images" / "images", listed[: args.batch])
        options = {name: get_dataset("dtd").options({"data_root": str(work / name)}) for name in ("all", "one")}
        jpeg_kib = sum(p.stat().st_size for p in (work / "images" / "images").rglob("*.jpg")) / args.images / 1024

        # The forward's inputs: the stage's own batches, decoded and preprocessed once.
        clip, _ = load_clip(model_path)
        clip = clip.to(device)
        data = get_dataset("dtd").load("test", preprocess_for(clip), options["all"])
        loader = torch.utils.data.DataLoader(data, batch_size=args.batch)
        batches = [images.pin_memory() if cuda else images for images, _ in loader]
        print(f"set up in {time.perf_counter() - started:.0f} s: {args.images} JPEGs of {width}x{height} "
              f"({jpeg_kib:.0f} KiB each), {args.model} random weights", flush=True)

        @torch.no_grad()
        def forward() -> float:
            sync()
            start = clock()
            for images in batches:
                clip.encode_image(images.to(device, non_blocking=True)).float().cpu()
            sync()
            return clock() - start

        def run_cache(which: str) -> float:
            out = work / f"cache-{which}.h5"
            cfg = cache.CacheConfig(batch_size=args.batch, workers=args.workers)
            sync()
            start = clock()
            cache.run(model_path, "dtd", "test", options[which], cfg, out, device=device)
            sync()
            elapsed = clock() - start
            out.unlink()
            return elapsed

        def load() -> float:
            loader = torch.utils.data.DataLoader(data, batch_size=args.batch, num_workers=args.workers, pin_memory=cuda)
            start = clock()
            for _ in loader:
                pass
            return clock() - start

        runs = {"forward": forward, "cache": lambda: run_cache("all"), "one": lambda: run_cache("one"), "load": load}
        with torch.no_grad():  # warm-up: first calls allocate, import and fill the file cache
            clip.encode_image(batches[0].to(device))
        run_cache("one")
        times: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        load_start = os.getloadavg()[0]
        for repeat in range(args.repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(runs[name]())
        load_end = os.getloadavg()[0]
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    n, b = args.images, args.batch
    per_repeat = [(t_fwd / n) / ((t_all - t_one) / (n - b)) for t_fwd, t_all, t_one in zip(times["forward"], times["cache"], times["one"])]
    med = {name: statistics.median(values) for name, values in times.items()}
    fwd_rate, stage_rate = n / med["forward"], (n - b) / (med["cache"] - med["one"])
    end_to_end = n / med["cache"]
    clock_name = "CPU" if clock is time.process_time else "wall"
    print(f"\n### cache: {args.model}, {n} images of {width}x{height}, batch {b}, workers {args.workers}, device {device}, "
          f"threads {args.threads}, {clock_name} time, median of {args.repeats} interleaved repeats; "
          f"load average {load_start:.2f} at start, {load_end:.2f} at end\n")
    print("| measurement | median (s) | min-max (s) | images/s |")
    print("|---|---:|---:|---:|")
    rows = [("encoder forward (decoded batches)", "forward", n / med["forward"]),
            (f"cache_activations, {n} images", "cache", end_to_end),
            (f"cache_activations, first {b} images (fixed cost)", "one", b / med["one"]),
            (f"loading alone (decode and preprocess, {args.workers} workers)", "load", n / med["load"])]
    for label, name, rate in rows:
        print(f"| {label} | {med[name]:.3f} | {min(times[name]):.3f}-{max(times[name]):.3f} | {rate:.1f} |")
    print(f"| cache_activations per image beyond the fixed cost | {med['cache'] - med['one']:.3f} | | {stage_rate:.1f} |")
    ratio = stage_rate / fwd_rate
    print(f"\ncache / forward throughput: {ratio:.3f}x (per repeat {min(per_repeat):.3f}-{max(per_repeat):.3f}x); "
          f"end to end, fixed cost included: {end_to_end / fwd_rate:.3f}x")
    bound = "loading" if med["load"] > med["forward"] else "the forward"
    print(f"ceiling: {bound} ({min(n / med['load'], fwd_rate):.1f} images/s); cache / ceiling {stage_rate / min(n / med['load'], fwd_rate):.3f}x")
    print(f"goal cache / forward >= {GOAL:.2f}x: {'met' if ratio >= GOAL else 'NOT met'}")


if __name__ == "__main__":
    main()
