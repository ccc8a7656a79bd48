"""What one GLARE training step costs against DINO with adapters, full fine-tuning DINO and a frozen forward.

Same backbone, image size, batch and device for every variant, in one run:

* ``glare``        -- adapters, all four loss terms (the method);
* ``dino_adapter`` -- adapters, ``loss.glob`` only (DINO's objective on the same adapters);
* ``dino_full``    -- ``model.tune=full``, ``loss.glob`` only: the student trains the whole backbone,
  the teacher is its EMA copy (two full backbones, no adapters);
* ``frozen_fwd``   -- a plain no-grad forward of the backbone over the same 2B views.

A step is :func:`glare.engine.loop.train_step` (views, forward/backward, clipping, AdamW, EMA). Times are
medians over ``--steps`` repetitions after ``--warmup``, the variants interleaved step by step so that a
change in machine load hits them all alike. Peak memory is measured per variant in a fresh subprocess
(CPU: peak RSS above the RSS after imports; CUDA: ``torch.cuda.max_memory_allocated``), so peaks don't mix.

    python benchmarks/step_cost.py --arch vit_small_patch16_224 --img-size 224 --batch 8 --steps 3
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections.abc import Callable

import torch
from _common import (  # first: sets the offline/quiet environment before glare imports timm and Ray
    bf16_peak_flops,
    current_rss_mb,
    load_average,
    machine_summary,
    markdown_table,
    median,
    peak_rss_mb,
    reset_peak_rss,
    resolve_device,
    timed,
    timed_cpu,
    verdict,
)

from glare.augment import make_views
from glare.config import ConfigError, GlareConfig, load_config
from glare.engine.loop import build_optimizer, set_schedules, train_step
from glare.engine.schedules import teacher_temp
from glare.models.adapter import build_adapters
from glare.models.glare import GlareModel, build_model
from glare.models.vit import create_backbone, encode

# Overrides that turn the default (GLARE) config into each compared variant.
VARIANTS: dict[str, tuple[str, ...]] = {
    "glare": (),
    "dino_adapter": ("loss.reg=0", "loss.loc1=0", "loss.loc2=0"),
    "dino_full": ("model.tune=full", "loss.reg=0", "loss.loc1=0", "loss.loc2=0"),
}
FROZEN = "frozen_fwd"
TERMS = ("glob", "reg", "loc1", "loc2")
# Targets: time and memory ratios, and the adapters' share of the backbone at the default config.
TARGET_TIME_VS_ADAPTER = 1.15
TARGET_TIME_VS_FULL = 0.7
TARGET_MEMORY_VS_FULL = 0.6
TARGET_ADAPTER_SHARE = 0.03
MEMORY_TAG = "STEP_COST_MEMORY "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_small_patch16_224", help="timm ViT name (model.arch)")
    p.add_argument("--img-size", "--view-size", dest="img_size", type=int, default=224,
                   help="view side in px (augment.view_size and model.img_size)")
    p.add_argument("--base-size", type=int, default=0, help="side of the input images (default: img-size * 8/7)")
    p.add_argument("--batch", type=int, default=8, help="images per step (each gives two views)")
    p.add_argument("--steps", type=int, default=3, help="timed repetitions per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto")
    p.add_argument("--weights", default="none", help="model.weights (random init is fine for cost)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on CUDA (train.amp; ignored on the CPU)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override applied to every variant, e.g. model.head.hidden_dim=512")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; default 1 on the CPU (what a 1-CPU Ray Train worker gets, and the only "
                        "setting whose CPU time stays steady on a shared machine: OpenMP threads spin while a "
                        "peer is descheduled), torch's default on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--terms", action="store_true",
                   help="also time forward_backward with each loss weight set to 0 in turn, plus all on")
    p.add_argument("--profile", action="store_true", help="torch.profiler: top ops of one step per variant")
    p.add_argument("--profile-rows", type=int, default=15)
    p.add_argument("--flops", action="store_true",
                   help="FLOPs per step (FlopCounterMode), achieved FLOP/s and, on a known GPU, utilisation")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory subprocesses")
    p.add_argument("--memory-probe", choices=[*VARIANTS, FROZEN], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch < 2 or args.steps < 1 or args.warmup < 0:
        p.error("--batch must be >= 2, --steps >= 1 and --warmup >= 0")
    return args


def config_for(args: argparse.Namespace, device: torch.device, *extra: str) -> GlareConfig:
    """The benchmark's config: method defaults, the CLI's model and sizes, then ``extra`` overrides."""
    base = args.base_size or math.ceil(args.img_size * 8 / 7)  # DINO's 256 px for 224 px views
    overrides = [
        f"model.arch={args.arch}", f"model.weights={args.weights}", f"model.img_size={args.img_size}",
        f"augment.view_size={args.img_size}", f"data.base_size={base}", f"train.batch_size={args.batch}",
        f"train.amp={args.amp and device.type == 'cuda'}", *args.set, *extra,
    ]
    return load_config(None, overrides)


def build(cfg: GlareConfig, device: torch.device, seed: int) -> tuple[GlareModel, torch.optim.Optimizer]:
    """Model and optimiser for one variant; the same seed gives every variant the same backbone init."""
    torch.manual_seed(seed)
    model = build_model(cfg).to(device).train()
    return model, build_optimizer(model, cfg, world_size=1)


def input_batch(cfg: GlareConfig, device: torch.device, seed: int) -> torch.Tensor:
    """A seeded uint8 batch (B, 3, base, base): the cost does not depend on the pixels."""
    g = torch.Generator().manual_seed(seed)
    b, s = cfg.train.batch_size, cfg.data.base_size
    return torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g).to(device)


def step_fn(cfg: GlareConfig, model: GlareModel, optimizer: torch.optim.Optimizer, images: torch.Tensor
            ) -> Callable[[], None]:
    """One full training step per call, as the Ray Train loop does it (schedules, train_step)."""
    state = {"step": 0, "skipped": 0}

    def run() -> None:
        set_schedules(optimizer, cfg, state["step"], 1)
        _, ok = train_step(model, model, optimizer, images, state["step"], cfg)
        state["step"] += 1
        state["skipped"] += not ok

    run.state = state  # type: ignore[attr-defined]
    return run


def frozen_fn(cfg: GlareConfig, vit: torch.nn.Module, images: torch.Tensor) -> Callable[[], None]:
    """A no-grad forward of the bare backbone over the 2B views of ``images`` (made once, untimed)."""
    with torch.no_grad():
        views = make_views(images, cfg.augment)
    x = torch.cat([views.x1, views.x2])
    amp = cfg.train.amp and x.is_cuda

    def run() -> None:
        with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            encode(vit, None, x)

    return run


def fwd_bwd_fn(cfg: GlareConfig, model: GlareModel, images: torch.Tensor) -> Callable[[], None]:
    """forward_backward alone (no clipping, optimiser or EMA); gradients are dropped after each call."""

    def run() -> None:
        model.forward_backward(images, teacher_temp(cfg, 0), amp=cfg.train.amp)
        model.zero_grad(set_to_none=True)

    return run


def time_interleaved(fns: dict[str, Callable[[], None]], warmup: int, reps: int, device: torch.device,
                     seed: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds per call of each function.

    Round r runs every function once, each after the same reseed (so all variants see the same views and
    patch masks in that round); a change in machine load during the run then hits every variant alike.
    """
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + reps):
        for name, fn in fns.items():
            torch.manual_seed(seed + 1000 + r)
            w, c = timed_cpu(fn, device)
            if r >= warmup:
                wall[name].append(w)
                cpu[name].append(c)
    return wall, cpu


def count(params) -> int:
    return sum(p.numel() for p in params)


def param_counts(model: GlareModel) -> dict[str, int]:
    """Trainable parameters, the backbone's, and the adapters' (what an export adds to the backbone)."""
    adapters = model.student["adapters"] if "adapters" in model.student else None
    return {"trainable": count(model.trainable_parameters()), "backbone": count(model.backbone.parameters()),
            "adapters": count(adapters.parameters()) if adapters is not None else 0}


def default_share() -> tuple[str, int, int, int]:
    """(arch, adapter params, backbone params, all trainable params) at the default config (random init)."""
    cfg = load_config(None, ["model.weights=none"])
    vit = create_backbone(cfg.model)
    adapters = build_adapters(vit.embed_dim, len(vit.blocks), cfg.model.adapter)
    model = GlareModel(cfg, vit)
    return cfg.model.arch, count(adapters.parameters()), count(vit.parameters()), count(
        model.trainable_parameters())


# ---------------------------------------------------------------------------------------------- memory
def memory_probe(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Peak memory of one variant in this (fresh) process: model, optimiser state and two steps."""
    name = args.memory_probe
    cfg = config_for(args, device, *VARIANTS.get(name, ()))
    images = input_batch(cfg, device, args.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = 0.0
    else:
        # One step of the tiny preset first: CPU libraries (oneDNN, Kornia, autograd) grow the RSS by tens
        # of MiB on first use, the same for every variant; that belongs in the baseline, not in the peak.
        tiny = load_config("tiny")
        step_fn(tiny, *build(tiny, device, args.seed), input_batch(tiny, device, args.seed))()
        reset_peak_rss()
        base = current_rss_mb()
    if name == FROZEN:
        torch.manual_seed(args.seed)
        fn = frozen_fn(cfg, create_backbone(cfg.model).to(device), images)
    else:
        fn = step_fn(cfg, *build(cfg, device, args.seed), images)
    for r in range(2):  # the second step holds AdamW's state (made lazily in the first) and activations
        torch.manual_seed(args.seed + 1000 + r)
        timed(fn, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()
    return {"peak_mb": peak, "base_mb": base}


def measure_memory(name: str, argv: list[str]) -> dict[str, float] | str:
    """Run :func:`memory_probe` for ``name`` in a subprocess; its numbers, or the error's last line."""
    cmd = [sys.executable, __file__, *argv, "--memory-probe", name]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(MEMORY_TAG):
            return json.loads(line[len(MEMORY_TAG):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return f"failed (rc {proc.returncode}: {tail})"


# ------------------------------------------------------------------------------------------- profiling
def profile_step(fn: Callable[[], None], device: torch.device, rows: int, seed: int) -> str:
    """torch.profiler table of one call of ``fn``: the top ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    torch.manual_seed(seed)
    with profile(activities=activities) as prof:
        timed(fn, device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


FLOP_BUCKETS = (("adapters", "adapters"), ("local_head", "local heads"), ("head", "global heads"),
                ("cross_attention", "region cross-attention"), ("backbone", "backbone"), ("blocks", "backbone"),
                ("patch_embed", "backbone"))


def forward_flop_shares(model: GlareModel, images: torch.Tensor, seed: int) -> dict[str, float]:
    """Forward FLOPs of one GLARE forward (teacher and student) split by part: backbone, adapters, heads, ...

    Forward only: FlopCounterMode's module attribution of backward ops is unreliable. Its counts follow
    the call stack, so a module's own FLOPs are its count minus that of its outermost counted
    descendants; the loss modules are left out (they only call the heads, which are counted as such).
    """
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(seed)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images, 0)
    totals = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()
              if name != "Global" and not name.startswith("GlareModel.losses")}
    out: dict[str, float] = {label: 0.0 for _, label in FLOP_BUCKETS}
    out.update({"views (Kornia)": 0.0, "other (attention maps, patch blur, regions)": 0.0})
    for name, flops in totals.items():
        inner = [k for k in totals if k.startswith(name + ".")]
        outermost = [k for k in inner if not any(k.startswith(o + ".") for o in inner)]
        own = flops - sum(totals[k] for k in outermost)
        parts = name.split(".")
        if parts[0] != "GlareModel":
            label = "views (Kornia)"
        else:
            label = next((lbl for key, lbl in FLOP_BUCKETS if key in parts[1:]),
                         "other (attention maps, patch blur, regions)")
        out[label] += own
    return out


def step_flops(fn: Callable[[], None], seed: int) -> int:
    """FLOPs of one call (forward and backward) as FlopCounterMode counts them (matmuls, convs, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(seed)
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------------------ main
def fmt_mb(value: dict[str, float] | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value['peak_mb'] - value['base_mb']:.0f}"


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def report_steps(args: argparse.Namespace, device: torch.device, wall: dict[str, list[float]],
                 cpu: dict[str, list[float]], memory: dict[str, dict[str, float] | str | None],
                 counts: dict[str, dict[str, int]]) -> None:
    """The main table: time, throughput, peak memory and parameters per variant."""
    step_s = {name: median(t) for name, t in wall.items()}
    cpu_s = {name: median(t) for name, t in cpu.items()}
    on_cpu = device.type == "cpu"
    rows = []
    for name in wall:
        c = counts.get(name)
        share = f"{100 * c['trainable'] / c['backbone']:.1f} %" if c else "-"
        rows.append([name, f"{step_s[name]:.3f}", *([f"{cpu_s[name]:.2f}"] if on_cpu else []),
                     f"{args.batch / step_s[name]:.1f}", f"{ratio(step_s[name], step_s['glare']):.2f}",
                     fmt_mb(memory[name]), f"{c['trainable']:,}" if c else "0", f"{c['adapters']:,}" if c else "0",
                     share])
    unit = "MiB allocated" if device.type == "cuda" else "MiB RSS above imports"
    print(markdown_table(["variant", "s/step", *(["CPU s/step"] if on_cpu else []), "img/s", "time / glare",
                          f"peak {unit}", "trainable params", "adapter params", "trainable / backbone"], rows))
    print(f"(backbone parameters: {counts['glare']['backbone']:,}; times are medians of {args.steps}; every "
          f"step's wall s: {'; '.join(f'{n} ' + ' '.join(f'{t:.2f}' for t in wall[n]) for n in wall)})\n")


def report_targets(device: torch.device, wall: dict[str, list[float]], cpu: dict[str, list[float]],
                   memory: dict[str, dict[str, float] | str | None]) -> None:
    """PASS/MISS for the four targets.

    Time ratios: on CUDA, of wall-clock medians. On the CPU, of process CPU-time medians (wall shown
    beside): CPU time does not count the time other processes hold the cores, which on a shared machine
    swings wall-clock times by 2x from step to step.
    """
    def time_ratio(a: str, b: str) -> tuple[float, str]:
        r_wall = ratio(median(wall[a]), median(wall[b]))
        if device.type != "cpu":
            return r_wall, f"{r_wall:.2f}"
        r_cpu = ratio(median(cpu[a]), median(cpu[b]))
        return r_cpu, f"{r_cpu:.2f} CPU time ({r_wall:.2f} wall)"

    (t_ad, t_ad_s), (t_full, t_full_s) = time_ratio("glare", "dino_adapter"), time_ratio("glare", "dino_full")
    targets = [["time glare / dino_adapter", t_ad_s, f"<= {TARGET_TIME_VS_ADAPTER}",
                verdict(t_ad <= TARGET_TIME_VS_ADAPTER)],
               ["time glare / dino_full", t_full_s, f"<= {TARGET_TIME_VS_FULL}",
                verdict(t_full <= TARGET_TIME_VS_FULL)]]
    mg, mf = memory["glare"], memory["dino_full"]
    if isinstance(mg, dict) and isinstance(mf, dict):
        m_full = ratio(mg["peak_mb"] - mg["base_mb"], mf["peak_mb"] - mf["base_mb"])
        targets.append(["peak memory glare / dino_full", f"{m_full:.2f}", f"<= {TARGET_MEMORY_VS_FULL}",
                        verdict(m_full <= TARGET_MEMORY_VS_FULL)])
    arch, n_adapt, n_backbone, n_train = default_share()
    share = n_adapt / n_backbone
    targets.append([f"adapters / backbone at defaults ({arch})", f"{100 * share:.2f} %",
                    f"<= {100 * TARGET_ADAPTER_SHARE:.0f} %", verdict(share <= TARGET_ADAPTER_SHARE)])
    targets.append(["(info) all trainable incl. training-only heads / backbone at defaults",
                    f"{100 * n_train / n_backbone:.1f} %", "-", "-"])
    print(markdown_table(["target", "measured", "goal", "result"], targets), flush=True)


def report_terms(args: argparse.Namespace, device: torch.device, cfg: GlareConfig, images: torch.Tensor) -> None:
    """forward_backward time with each loss weight set to 0 in turn, and all on (same batch, same views)."""
    print(f"\nPer-term cost: forward_backward only (no optimiser/EMA), same batch and views, median of {args.steps}")
    term_cfgs = {"all on": cfg, **{f"{t}=0": config_for(args, device, f"loss.{t}=0") for t in TERMS}}
    fns = {name: fwd_bwd_fn(c, build(c, device, args.seed)[0], images) for name, c in term_cfgs.items()}
    wall, cpu = time_interleaved(fns, args.warmup, args.steps, device, args.seed)
    base_w, base_c = median(wall["all on"]), median(cpu["all on"])
    on_cpu = device.type == "cpu"
    rows = []
    for name in fns:
        w, c = median(wall[name]), median(cpu[name])
        cost = "-" if name == "all on" else f"{base_w - w:+.3f} ({100 * (base_w - w) / base_w:.0f} %)"
        cpu_cost = "-" if name == "all on" else f"{base_c - c:+.2f} ({100 * (base_c - c) / base_c:.0f} %)"
        rows.append([name, f"{w:.3f}", *([f"{c:.2f}"] if on_cpu else []), cost, *([cpu_cost] if on_cpu else [])])
    print(markdown_table(["loss weights", "fwd+bwd s", *(["CPU s"] if on_cpu else []), "term's cost: all on - this",
                          *(["term's CPU cost"] if on_cpu else [])], rows), flush=True)


def report_flops(args: argparse.Namespace, device: torch.device, fns: dict[str, Callable[[], None]],
                 wall: dict[str, list[float]], model: GlareModel, images: torch.Tensor) -> None:
    """FLOPs per step, achieved FLOP/s and model FLOP utilisation; GLARE's forward FLOPs by part."""
    peak = bf16_peak_flops(device)
    print(f"\nFLOPs per step (FlopCounterMode: matmul, conv, attention), bf16 peak "
          f"{'%.0f TFLOP/s' % (peak / 1e12) if peak else 'unknown for this device'}")
    rows = []
    for name, fn in fns.items():
        flops = step_flops(fn, args.seed)
        achieved = flops / median(wall[name])
        rows.append([name, f"{flops / 1e9:.2f}", f"{achieved / 1e12:.4f}",
                     f"{100 * achieved / peak:.1f} %" if peak else "-"])
    print(markdown_table(["variant", "GFLOP/step", "achieved TFLOP/s", "MFU (of bf16 peak)"], rows))
    shares = forward_flop_shares(model, images, args.seed)
    total = sum(shares.values())
    print("\nGLARE forward FLOPs by part (teacher + student):")
    print(markdown_table(["part", "GFLOP", "share"],
                         [[k, f"{v / 1e9:.2f}", f"{100 * v / total:.1f} %"] for k, v in shares.items() if v]),
          flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = resolve_device(args.device)
    threads = args.threads or (1 if device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    if args.memory_probe:
        print(MEMORY_TAG + json.dumps(memory_probe(args, device)), flush=True)
        return

    print(machine_summary(device))
    cfgs = {name: config_for(args, device, *extra) for name, extra in VARIANTS.items()}
    cfg = cfgs["glare"]
    images = input_batch(cfg, device, args.seed)
    print(f"config: {args.arch}, views {args.img_size} px from {cfg.data.base_size} px images, batch {args.batch} "
          f"(2 views each), {args.warmup} warm-up + {args.steps} timed steps, weights={args.weights}, "
          f"amp={cfg.train.amp}, extra overrides {args.set or 'none'}\n", flush=True)

    built = {name: build(c, device, args.seed) for name, c in cfgs.items()}
    fns: dict[str, Callable[[], None]] = {name: step_fn(cfgs[name], *built[name], images) for name in built}
    fns[FROZEN] = frozen_fn(cfg, built["glare"][0].backbone, images)
    wall, cpu = time_interleaved(fns, args.warmup, args.steps, device, args.seed)
    for name, fn in fns.items():
        skipped = getattr(fn, "state", {}).get("skipped", 0)
        if skipped:
            print(f"warning: {name}: {skipped} step(s) had a non-finite loss and skipped the update")

    probe_argv = [a for a in argv if a not in ("--terms", "--profile", "--flops")]
    memory = {name: measure_memory(name, probe_argv) if args.memory else None for name in fns}
    counts = {name: param_counts(model) for name, (model, _) in built.items()}
    print(f"load average after the timed steps: {load_average()}")
    report_steps(args, device, wall, cpu, memory, counts)
    report_targets(device, wall, cpu, memory)
    if args.terms:
        report_terms(args, device, cfg, images)
    if args.flops:
        report_flops(args, device, fns, wall, built["glare"][0], images)
    if args.profile:
        for name in VARIANTS:
            print(f"\ntorch.profiler, one {name} step, top {args.profile_rows} ops by self time:")
            print(profile_step(fns[name], device, args.profile_rows, args.seed), flush=True)
    print(f"\nload average at the end: {load_average()}")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:
        raise SystemExit(f"step_cost: {err} (change it with --set KEY=VALUE)") from None
