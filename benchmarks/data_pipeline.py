"""Images per second of GLARE's input pipeline against a torch DataLoader doing the same work.

Both sides read the same image files and deliver the same tensors to the consumer's device: two float
views (B, 3, S, S) in [0, 1] per batch, made from images decoded, short-side resized to ``base_size``
and centre-cropped (:func:`glare.data.pretrain.decode_image` in both).

* ``ray_kornia``: :func:`glare.data.pretrain.build_pretrain_dataset` (Ray Data decode tasks) ->
  ``iter_torch_batches`` -> uint8 batch to the device -> :func:`glare.augment.make_views` (Kornia) there.
  This is what the training loop does.
* ``ray_views_in_tasks``: the same, but ``make_views`` runs inside Ray Data tasks after decoding (one thread
  each, in parallel), and the consumer only moves the views to the device: a candidate for CPU training.
* ``torch_dataloader``: ``torch.utils.data.DataLoader`` with ``num_workers = --cpus``; each worker decodes
  and makes both views with torchvision's v2 CPU transforms (DINO's recipe: random resized crop, flip,
  colour jitter, grayscale, blur, solarise); the batch is then moved to the device. It does not impose
  GLARE's minimum overlap between the two crops (slightly less work than ``make_views``).

The process (and so Ray's workers and the DataLoader's workers, which inherit it) is pinned to ``--cpus``
cores, Ray gets ``num_cpus = --cpus``: all sides have the same CPUs. The consumer runs torch on
``--consumer-threads`` (1, as a 1-CPU Ray Train worker does). A warm-up pass is excluded; the
figure is the median over ``--passes`` passes. With ``--compare-step`` (always on CUDA) it also times
``make_views`` against a GLARE training step at the same batch and view size.

    python benchmarks/data_pipeline.py --images 512 --batch 32 --cpus 2 --passes 3
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from _common import load_average, machine_summary, markdown_table, median, resolve_device, synchronize, timed, verdict
from PIL import Image

from glare.augment import make_views
from glare.config import AugmentConfig, GlareConfig, MosaicConfig
from glare.data.pretrain import build_pretrain_dataset, decode_image

# Augmentation must stay well under this share of a training step on a GPU.
TARGET_VIEWS_SHARE = 0.10
# Distinct mosaics behind the generated JPEGs (each file is a different crop of one of them).
UNIQUE_MOSAICS = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="jpeg",
                   help="'jpeg' (generated 400x300 JPEGs, cached), 'mosaic' (the mosaic's unlabelled PNGs) "
                        "or a folder of images")
    p.add_argument("--images", type=int, default=512, help="number of images for 'jpeg' / 'mosaic'")
    p.add_argument("--base-size", type=int, default=256, help="decoded image side (data.base_size)")
    p.add_argument("--view-size", type=int, default=224, help="view side (augment.view_size)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cpus", type=int, default=min(2, os.cpu_count() or 1),
                   help="CPUs for both pipelines: Ray num_cpus and DataLoader num_workers")
    p.add_argument("--passes", type=int, default=3, help="timed passes over the images, after one warm-up")
    p.add_argument("--device", default="auto", help="where the views are consumed: cpu, cuda, auto")
    p.add_argument("--compare-step", action="store_true",
                   help="also time make_views against a GLARE train step (always done on CUDA)")
    p.add_argument("--arch", default="vit_small_patch16_224", help="backbone of that train step")
    p.add_argument("--consumer-threads", type=int, default=1, help="torch threads of the consuming process")
    p.add_argument("--pipelines", default="ray_kornia,ray_views_in_tasks,torch_dataloader",
                   help="comma-separated subset")
    args = p.parse_args(argv)
    if args.base_size < args.view_size:
        p.error(f"--base-size ({args.base_size}) must be >= --view-size ({args.view_size})")
    if min(args.images, args.batch, args.cpus, args.passes) < 1:
        p.error("--images, --batch, --cpus and --passes must be >= 1")
    return args


# ----------------------------------------------------------------------------------------------- images
def jpeg_folder(n: int, cache: Path) -> Path:
    """``n`` 400x300 JPEGs cut from mosaics, written once under ``cache`` (decode work like a photo set)."""
    from glare.data.mosaic import generate_mosaic

    folder = cache / f"jpeg-{n}"
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    mosaics, _ = generate_mosaic(10, 448, n=min(n, UNIQUE_MOSAICS), seed=0, split="unlabelled")
    rng = np.random.default_rng(0)
    for i in range(n):
        y, x = rng.integers(0, 448 - 300), rng.integers(0, 448 - 400)
        crop = mosaics[i % len(mosaics), y:y + 300, x:x + 400]
        Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def image_folder(args: argparse.Namespace) -> Path:
    """The folder both pipelines read."""
    cache = Path.home() / ".cache" / "glare" / "bench"
    if args.source == "jpeg":
        return jpeg_folder(args.images, cache)
    if args.source == "mosaic":
        from glare.data.mosaic import ensure_mosaic

        cfg = MosaicConfig(image_size=args.base_size, train=1, val=1, unlabelled=args.images,
                           cache_dir=str(cache / "mosaic"))
        return ensure_mosaic(cfg) / "unlabelled"
    folder = Path(args.source).expanduser()
    if not folder.is_dir():
        raise SystemExit(f"--source {args.source}: not 'jpeg', 'mosaic' or a folder")
    return folder


def image_files(folder: Path) -> list[Path]:
    from glare.data.segmentation import IMAGE_EXTENSIONS

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise SystemExit(f"no images under {folder}")
    return files


# ------------------------------------------------------------------------------------------- pipelines
def _ray_dataset(folder: Path, args: argparse.Namespace):
    """The pre-training dataset over ``folder`` (decoded anew on every pass), on a local Ray of ``--cpus``."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                 object_store_memory=512 * 2**20)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one INFO line per pass otherwise
    ray.data.DataContext.get_current().enable_progress_bars = False
    return build_pretrain_dataset(str(folder), args.base_size, materialize=False)


def ray_kornia(folder: Path, args: argparse.Namespace, aug: AugmentConfig, device: torch.device
               ) -> Callable[[], Iterator[int]]:
    """GLARE's pipeline: Ray Data decode, iter_torch_batches, Kornia views on ``device`` (in the consumer)."""
    ds = _ray_dataset(folder, args)

    def one_pass() -> Iterator[int]:
        for row in ds.iter_torch_batches(batch_size=args.batch):
            images = row["image"].to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
            views = make_views(images, aug)
            yield views.x1.shape[0]

    return one_pass


def _views_task(batch: dict[str, np.ndarray], aug: AugmentConfig) -> dict[str, np.ndarray]:
    """Ray Data map: Kornia views of a decoded batch inside a Ray task (one thread, as a 1-CPU task)."""
    torch.set_num_threads(1)
    images = torch.from_numpy(np.array(batch["image"])).permute(0, 3, 1, 2).contiguous()
    v = make_views(images, aug)
    return {"x1": v.x1.numpy(), "x2": v.x2.numpy(), "box1": v.box1.numpy(), "box2": v.box2.numpy(),
            "flip1": v.flip1.numpy(), "flip2": v.flip2.numpy()}


def ray_views_in_tasks(folder: Path, args: argparse.Namespace, aug: AugmentConfig, device: torch.device
                       ) -> Callable[[], Iterator[int]]:
    """A variant for CPU training: the same Kornia views, made in parallel Ray Data tasks after decoding;
    the consumer only moves the finished views to ``device``."""
    ds = _ray_dataset(folder, args).map_batches(_views_task, fn_kwargs={"aug": aug}, batch_size=args.batch,
                                                batch_format="numpy")

    def one_pass() -> Iterator[int]:
        for row in ds.iter_torch_batches(batch_size=args.batch):
            views = {k: row[k].to(device, non_blocking=True) for k in ("x1", "x2")}
            yield views["x1"].shape[0]

    return one_pass


class TorchvisionViews(torch.utils.data.Dataset):
    """Decode one file (as Ray's path does) and make DINO's two views with torchvision v2 transforms."""

    def __init__(self, files: list[Path], base_size: int, aug: AugmentConfig) -> None:
        from torchvision.transforms import v2 as T

        self.files, self.base_size = files, base_size

        def view(i: int) -> T.Compose:
            return T.Compose([
                T.RandomResizedCrop(aug.view_size, scale=tuple(aug.crop_scale), antialias=True),
                T.RandomHorizontalFlip(aug.flip_p),
                T.RandomApply([T.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue)], p=aug.jitter_p),
                T.RandomGrayscale(aug.grayscale_p),
                T.RandomApply([T.GaussianBlur(13, (0.1, 2.0))], p=aug.blur_p[i]),
                T.RandomSolarize(threshold=128, p=aug.solarize_p[i]),  # on uint8, as DINO does on PIL images
                T.ToDtype(torch.float32, scale=True),
            ])

        self.views = (view(0), view(1))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(decode_image(self.files[i].read_bytes(), self.base_size)).permute(2, 0, 1)
        return self.views[0](image), self.views[1](image)


def torch_dataloader(files: list[Path], args: argparse.Namespace, aug: AugmentConfig, device: torch.device
                     ) -> Callable[[], Iterator[int]]:
    """The baseline: DataLoader workers decode and augment on the CPU; batches go to ``device``."""
    loader = torch.utils.data.DataLoader(
        TorchvisionViews(files, args.base_size, aug), batch_size=args.batch, num_workers=args.cpus,
        persistent_workers=True, pin_memory=device.type == "cuda", shuffle=True)

    def one_pass() -> Iterator[int]:
        for x1, x2 in loader:
            x1, x2 = x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)
            yield x1.shape[0]

    return one_pass


def time_passes(pipelines: dict[str, Callable[[], Iterator[int]]], passes: int, device: torch.device
                ) -> dict[str, list[tuple[int, float]]]:
    """(images, seconds) of each timed pass of each pipeline, after one untimed warm-up pass each.

    Passes are interleaved (round r runs every pipeline once), so a change in machine load during the
    run hits every pipeline alike.
    """
    out: dict[str, list[tuple[int, float]]] = {name: [] for name in pipelines}
    for r in range(passes + 1):
        for name, one_pass in pipelines.items():
            start = time.perf_counter()
            n = sum(one_pass())
            synchronize(device)
            if r:
                out[name].append((n, time.perf_counter() - start))
    return out


# ------------------------------------------------------------------------------------ views vs step
def views_vs_step(args: argparse.Namespace, aug: AugmentConfig, device: torch.device, reps: int = 5
                  ) -> tuple[float, float, GlareConfig]:
    """Median seconds of make_views on a device batch and of a GLARE train step (which includes it)."""
    import step_cost

    step_args = step_cost.parse_args(["--arch", args.arch, "--img-size", str(args.view_size),
                                      "--base-size", str(args.base_size), "--batch", str(args.batch)])
    cfg = step_cost.config_for(step_args, device)
    images = step_cost.input_batch(cfg, device, 0)
    views_s = [timed(lambda: make_views(images, aug), device) for _ in range(reps + 1)][1:]
    step = step_cost.step_fn(cfg, *step_cost.build(cfg, device, 0), images)
    step_s = [timed(step, device) for _ in range(reps + 1)][1:]
    return median(views_s), median(step_s), cfg


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if hasattr(os, "sched_setaffinity"):  # children (Ray's processes, DataLoader workers) inherit this
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < args.cpus:
            raise SystemExit(f"--cpus {args.cpus}: only {len(cores)} cores available")
        os.sched_setaffinity(0, cores[:args.cpus])
    # The consumer is a training process: a 1-CPU Ray Train worker runs torch on one thread. More threads
    # here would also fight the decode workers for the same cores (OpenMP barriers stall under that).
    torch.set_num_threads(args.consumer_threads)
    print(machine_summary(device))
    aug = AugmentConfig(view_size=args.view_size)
    folder = image_folder(args)
    files = image_files(folder)
    print(f"images: {len(files)} files under {folder}; decoded to {args.base_size} px; two {args.view_size} px "
          f"views; batch {args.batch}; {args.cpus} CPUs; 1 warm-up + {args.passes} timed passes\n", flush=True)

    makers = {"ray_kornia": lambda: ray_kornia(folder, args, aug, device),
              "ray_views_in_tasks": lambda: ray_views_in_tasks(folder, args, aug, device),
              "torch_dataloader": lambda: torch_dataloader(files, args, aug, device)}
    chosen = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(makers))
    if unknown:
        raise SystemExit(f"--pipelines: unknown {unknown}; choose from {sorted(makers)}")
    results = time_passes({name: makers[name]() for name in chosen}, args.passes, device)
    rates: dict[str, float] = {}
    rows = []
    for name, passes in results.items():
        per_pass = [n / s for n, s in passes]
        rates[name] = median(per_pass)
        rows.append([name, f"{rates[name]:.1f}", " / ".join(f"{r:.1f}" for r in per_pass), str(passes[0][0])])
    print()
    print(markdown_table(["pipeline", "img/s (median)", "per pass", "images/pass"], rows))
    print(f"(load average after the passes: {load_average()})")
    if "torch_dataloader" in rates:
        for name in (n for n in rates if n != "torch_dataloader"):
            r = rates[name] / rates["torch_dataloader"]
            print(f"ratio {name} / torch_dataloader = {r:.2f} (goal on CPU: >= 1): {verdict(r >= 1)}")

    if device.type == "cuda" or args.compare_step:
        views_s, step_s, cfg = views_vs_step(args, aug, device)
        share = views_s / step_s
        print(f"\nmake_views on {device}: {1000 * views_s:.1f} ms per batch of {args.batch}; GLARE train step "
              f"({args.arch}, amp={cfg.train.amp}): {1000 * step_s:.1f} ms; share {100 * share:.1f} % "
              f"(goal < {100 * TARGET_VIEWS_SHARE:.0f} %): {verdict(share < TARGET_VIEWS_SHARE)}")


if __name__ == "__main__":
    sys.exit(main())
