"""The per-worker train function that Ray Train's TorchTrainer runs on every worker.

It does schedules, the optimiser, checkpoints, logging and evaluation; the
method itself is :meth:`GlareModel.forward_backward` / ``update_teacher``.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from glare.config import GlareConfig, from_dict
from glare.data.pretrain import shuffled_batches
from glare.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from glare.engine.health import exploded, target_warnings
from glare.engine.memory import PeakMemory
from glare.engine.schedules import cosine, teacher_momentum, teacher_temp, warmup_cosine
from glare.eval.linear_probe import ProbeResult
from glare.models.glare import GlareModel, build_model

TERMS = ("glob", "reg", "loc1", "loc2")


@dataclass
class LoopState:
    """Counters that a checkpoint carries besides the weights."""

    step: int = 0
    images_seen: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed: the data position
    nonfinite_total: int = 0
    nonfinite_run: int = 0
    miou_before: float = float("nan")
    miou_last: float = float("nan")
    train_seconds: float = 0.0
    # The process's CPU time in the same steps (all threads): unlike wall time, barely moved by other
    # processes sharing the cores, so it compares step costs on a busy CPU machine.
    train_cpu_seconds: float = 0.0


def build_optimizer(model: GlareModel, cfg: GlareConfig, world_size: int) -> torch.optim.Optimizer:
    """AdamW on the student's parameters; biases, norms and scales get no weight decay.

    The heads form their own groups, at ``optim.head_lr_scale`` times the lr (``lr_scale`` of a group,
    which :func:`set_schedules` applies).
    """
    heads = {id(p) for name in ("head", "local_head") if name in model.student
             for p in model.student[name].parameters()}
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for p in model.trainable_parameters():
        groups.setdefault((id(p) in heads, p.ndim > 1), []).append(p)
    param_groups = [
        {"params": params, "apply_wd": decay, "lr_scale": cfg.optim.head_lr_scale if head else 1.0,
         **({} if decay else {"weight_decay": 0.0})}
        for (head, decay), params in sorted(groups.items())  # adapters' groups first: they set the logged lr
    ]
    return torch.optim.AdamW(param_groups, lr=scaled_lr(cfg, world_size))


def scaled_lr(cfg: GlareConfig, world_size: int) -> float:
    """The linear scaling rule: ``optim.lr`` is per 256 images of global batch."""
    return cfg.optim.lr * cfg.train.batch_size * world_size / 256.0


def set_schedules(optimizer: torch.optim.Optimizer, cfg: GlareConfig, step: int, world_size: int
                  ) -> tuple[float, float]:
    """Write the step's lr and weight decay into the optimiser; return both."""
    o, steps = cfg.optim, cfg.train.steps
    lr = warmup_cosine(step, steps, scaled_lr(cfg, world_size), o.min_lr, o.warmup_steps)
    wd = cosine(step, steps, o.weight_decay, o.weight_decay_end)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if group.get("apply_wd"):
            group["weight_decay"] = wd
    return lr, wd


def train_step(model: GlareModel, runner: torch.nn.Module, optimizer: torch.optim.Optimizer,
               images: torch.Tensor, step: int, cfg: GlareConfig) -> tuple[dict[str, float], bool]:
    """One step: forward/backward, clip, and (only if everything is finite) update and EMA.

    Gradients are all-reduced before the finiteness check, so every worker
    takes the same decision and the replicas never diverge. ``metrics`` gets the
    trainable weights' norm before and after the update (``weight_norm_before``,
    ``weight_norm``), which :func:`glare.engine.health.exploded` judges.
    """
    metrics = model.forward_backward(images, teacher_temp(cfg, step), runner, amp=cfg.train.amp)
    params = model.trainable_parameters()
    max_norm = cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    ok = math.isfinite(grad_norm) and math.isfinite(metrics["loss"])
    if ok:
        metrics["weight_norm_before"] = _norm(params)
        optimizer.step()
        metrics["weight_norm"] = _norm(params)
        metrics["momentum"] = model.update_teacher(teacher_momentum(cfg, step))
    optimizer.zero_grad(set_to_none=True)
    metrics["grad_norm"] = grad_norm
    return metrics, ok


def _norm(params: list[torch.nn.Parameter]) -> float:
    """The L2 norm of all ``params`` together (the same on every worker: the replicas are identical)."""
    with torch.no_grad():
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(params)))) if params else 0.0


def model_state(model: GlareModel) -> dict[str, Any]:
    """What trains and nothing else: student, teacher (EMA) and the loss centres."""
    return {"student": model.student.state_dict(), "teacher": model.teacher.state_dict(),
            "losses": model.losses.state_dict()}


def load_model_state(model: GlareModel, state: dict[str, Any]) -> None:
    model.student.load_state_dict(state["student"])
    model.teacher.load_state_dict(state["teacher"])
    model.losses.load_state_dict(state["losses"])


def epoch_batches(shard: Any, cfg: GlareConfig, epoch: int, rank: int, batch_size: int | None = None,
                  drop_last: bool = True) -> Any:
    """One pass over the worker's shard in the epoch's order (see :func:`glare.data.pretrain.shuffled_batches`)."""
    return shuffled_batches(shard, batch_size or cfg.train.batch_size, seed=cfg.train.seed, epoch=epoch, rank=rank,
                            buffer=cfg.data.shuffle_buffer, drop_last=drop_last)


def bootstrap_heads(model: GlareModel, shard: Any, cfg: GlareConfig, rank: int, device: torch.device
                    ) -> dict[str, int]:
    """Bootstrap the heads on rank 0 from its first ``model.head_init_images`` images, then broadcast.

    Every rank draws a first batch (the shards are split in lock-step), rank 0 fits the heads, and the
    others receive its student and teacher, so every replica starts from the same heads.
    """
    if not model.heads_to_bootstrap():
        return {}
    batch = next(iter(epoch_batches(shard, cfg, -1, rank, cfg.model.head_init_images, drop_last=False)))
    seen: dict[str, int] = {}
    if rank == 0:
        images = batch["image"].to(device).permute(0, 3, 1, 2).contiguous()
        generator = torch.Generator(device).manual_seed(cfg.train.seed)
        seen = model.bootstrap_heads(images, generator)
    if dist.is_available() and dist.is_initialized():
        for tensor in [*model.student.state_dict().values(), *model.teacher.state_dict().values()]:
            dist.broadcast(tensor, src=0)
    return seen


def _mean_across_workers(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def truncate_log(path: Path, step: int, final: bool = False, note: dict[str, Any] | None = None) -> int:
    """Keep the records of metrics.jsonl up to ``step`` (a resume's checkpoint), drop later ones and every
    closing ``end`` record, and append ``note`` (the ``resume`` record) in the same atomic replace, so
    that a reader who sees the new file sees where its news starts; returns how many were dropped.

    Everything logged at or before a checkpoint's step was written before that checkpoint, so the
    resumed run, which redoes the steps after it, then logs each step exactly once. The ``final``
    checkpoint (the last step's) is the exception: a resume from it redoes the closing evaluation,
    so that step's evaluation records (``miou`` and ``probe``) go too.
    """
    lines = path.read_text().splitlines() if path.is_file() else []
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed writer
            continue
        closing_eval = final and record.get("step") == step and (record.get("event") == "probe"
                                                                  or set(record) == {"step", "miou"})
        if record.get("event") != "end" and record.get("step", 0) <= step and not closing_eval:
            kept.append(line)
    if not lines and note is None:
        return 0
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept + ([json.dumps(note)] if note else [])))
    tmp.replace(path)
    return len(lines) - len(kept)


class RunLog:
    """metrics.jsonl + TensorBoard in the run directory, written by rank 0 only.

    ``resume_step``: the step of the checkpoint this run resumes from (None: a fresh start; ``final``:
    the last step's, whose closing evaluation is redone). The log is cut back to it (:func:`truncate_log`;
    a fresh start empties it) and TensorBoard purges later events, so a resumed run's records hold each
    step once.
    """

    def __init__(self, run_dir: Path | None, resume_step: int | None = None, final: bool = False,
                 note: dict[str, Any] | None = None) -> None:
        self.run_dir = run_dir
        self.tb = None
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            dropped = truncate_log(run_dir / "metrics.jsonl", resume_step if resume_step is not None else -1, final,
                                   note)
            if dropped and resume_step is not None:
                say(f"metrics.jsonl: dropped {dropped} records after the checkpoint's step {resume_step}")
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=(resume_step or 0) + 1)
            if dropped and resume_step is None:
                # An earlier attempt logged here but left no checkpoint Ray registered (a worker or node lost
                # before the first one, or a rerun of a run that died early): the work is redone, so say so.
                self.warning(0, f"no checkpoint to resume from: started over from step 0 (the {dropped} records "
                                "an earlier attempt left in metrics.jsonl were dropped)")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if self.run_dir is None:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()

    def event(self, name: str, **fields: Any) -> None:
        """A one-off record (``"event": name``) in metrics.jsonl, e.g. the head bootstrap."""
        if self.run_dir is not None:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"event": name, **fields}) + "\n")

    def probe(self, step: int, result: ProbeResult, data: Any) -> None:
        """A ``"probe"`` event: the evaluation's mIoU and per-class IoU (what the run report tabulates)."""
        per_class = [None if math.isnan(v) else v for v in result.per_class_iou]
        self.event("probe", step=step, miou=result.miou, per_class_iou=per_class, class_names=result.class_names,
                   labelled_images={"train": len(data.train[0]), "val": len(data.val[0]),
                                    "classes": data.num_classes})

    def warning(self, step: int, message: str) -> None:
        """A ``"warning"`` event, which the driver shows even when worker output is not forwarded."""
        self.event("warning", step=step, message=message)

    def end(self, record: dict[str, Any]) -> None:
        """The run's closing record (``"event": "end"``), which the driver's summary reads."""
        if self.run_dir is not None:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"event": "end", **record}) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def evaluate(model: GlareModel, cfg: GlareConfig, device: torch.device, data: Any) -> ProbeResult:
    """The linear probe of the student's features (rank 0): mIoU and per-class IoU."""
    from glare.eval.protocol import run_probe

    fn = lambda x: model.dense_features(x, cfg.eval.last_blocks)  # noqa: E731
    was_training = model.training
    model.eval()
    try:
        result = run_probe(fn, data, cfg.eval, device)  # extracts features under no_grad itself
    finally:
        model.train(was_training)
    return result


def worker_nodes(world: int) -> list[str]:
    """The Ray node id of every worker, by rank (the summary's record of where a run trained)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [here]
    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, here)
    return nodes


def say(message: str, *, warning: bool = False) -> None:
    """The worker's one output channel: a ``[glare]`` line (warnings on stderr).

    Only rank 0 calls it; what the driver must show also goes to metrics.jsonl (see
    :mod:`glare.console`), since the driver does not forward worker output by default.
    """
    print(f"[glare] {'warning: ' if warning else ''}{message}", file=sys.stderr if warning else sys.stdout,
          flush=True)


def resume(model: GlareModel, optimizer: torch.optim.Optimizer, rank: int, device: torch.device
           ) -> LoopState | None:
    """Load Ray Train's checkpoint, if any, into the model, optimiser and RNG; its loop state, else None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        saved = load_checkpoint(d, map_location=device)
    load_model_state(model, saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    state = LoopState(**saved["loop"])
    set_rng_state(saved["rng"][min(rank, len(saved["rng"]) - 1)])
    if rank == 0:
        say(f"resumed from step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
    return state


class WorkerRun:
    """One worker's training run: :meth:`start` (build, resume or bootstrap, first evaluation),
    :meth:`train` (steps, with logging, evaluations and checkpoints) and :meth:`finish`.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        import ray.train
        import ray.train.torch

        self.cfg = cfg = from_dict(config["cfg"])
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        # Made before the model is built: the weights, the teacher and the optimiser's state all count.
        self.memory = PeakMemory(self.device)
        self.train_peak_mb = float("nan")
        torch.manual_seed(cfg.train.seed)  # identical (random-init) weights on every worker and every restart
        self.model = build_model(cfg).to(self.device)
        torch.manual_seed(cfg.train.seed + self.rank)  # different views on every worker
        self.model.train()
        self.runner = ray.train.torch.prepare_model(self.model, move_to_device=False) if self.world > 1 else self.model
        self.nodes = worker_nodes(self.world)
        self.optimizer = build_optimizer(self.model, cfg, self.world)
        self.run_dir = Path(config["run_dir"]) if self.rank == 0 else None
        self.shard = ray.train.get_dataset_shard("train")
        self.probe_data: Any = None
        self.last: dict[str, Any] = {}  # the metrics of the last logged step
        self.stop_reason = ""
        self.warned: set[str] = set()  # each target problem is told once
        self.window_t, self.window_images = time.perf_counter(), 0

    def start(self) -> None:
        """Resume from Ray's checkpoint or bootstrap the heads; evaluate the init (rank 0, once per run)."""
        resumed = resume(self.model, self.optimizer, self.rank, self.device)
        self.state = resumed or LoopState()
        # A resume from the final checkpoint (a run killed while closing) only redoes the closing evaluation.
        # The resume goes on the record (the driver shows metrics.jsonl, not the workers' lines).
        note = ({"event": "resume", "step": self.state.step, "epoch": self.state.epoch,
                 "batch": self.state.batch_in_epoch} if resumed else None)
        self.runlog = RunLog(self.run_dir, resume_step=self.state.step if resumed else None,
                             final=bool(resumed) and self.state.step >= self.cfg.train.steps, note=note)
        # The step of the newest checkpoint a resume can train from (None: none written yet).
        self.last_good: int | None = self.state.step if resumed else None
        if self.rank == 0:
            from glare.eval.protocol import load_probe_data

            self.probe_data = load_probe_data(self.cfg.data, self.cfg.eval, multiple=self.model.patch_size)
            if math.isnan(self.state.miou_before):
                self.state.miou_before = self.evaluate(0, record=False).miou
                say(f"mIoU before: {100 * self.state.miou_before:.2f}")
        if resumed is None:  # a resumed run has its bootstrapped heads in the checkpoint
            seen = bootstrap_heads(self.model, self.shard, self.cfg, self.rank, self.device)
            if seen:
                self.runlog.event("head_bootstrap", step=0, tokens=seen)
                if self.rank == 0:
                    say("heads bootstrapped from the init's tokens: "
                        + ", ".join(f"{name} on {n} tokens" for name, n in seen.items()))

    def evaluate(self, step: int, record: bool = True) -> ProbeResult:
        """The probe at ``step`` (rank 0): the last mIoU, a ``miou`` record (if ``record``) and a ``probe`` event."""
        result = evaluate(self.model, self.cfg, self.device, self.probe_data)
        self.state.miou_last = result.miou
        if record:
            self.runlog.write(step, {"miou": result.miou})
        self.runlog.probe(step, result, self.probe_data)
        return result

    def train(self) -> None:
        """Epochs of the worker's shard until ``train.steps`` or a stop, from the checkpoint's data position."""
        state, cfg = self.state, self.cfg
        self.memory.restart()  # the first evaluation's and the head bootstrap's peaks are not the steps'
        while state.step < cfg.train.steps and not self.stop_reason:
            skip, got_batch = state.batch_in_epoch, False
            for i, row in enumerate(epoch_batches(self.shard, cfg, state.epoch, self.rank)):
                if i < skip:  # resume at the data position of the checkpoint
                    continue
                got_batch = True
                if not self.step(i, row) or state.step >= cfg.train.steps:
                    break
            else:
                state.epoch += 1
                state.batch_in_epoch = 0
                if not got_batch and skip == 0:
                    raise RuntimeError(f"the training data yields no full batch of {cfg.train.batch_size} images "
                                       "per worker; lower train.batch_size or add images")
        self.train_peak_mb = self.memory.peak_mb()

    def step(self, i: int, row: dict[str, Any]) -> bool:
        """Train on batch ``i`` of the epoch and do what the new step calls for; False once the run must stop."""
        state, cfg = self.state, self.cfg
        images = row["image"].to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
        set_schedules(self.optimizer, cfg, state.step, self.world)
        t0, cpu0 = time.perf_counter(), time.process_time()
        metrics, ok = train_step(self.model, self.runner, self.optimizer, images, state.step, cfg)
        state.train_seconds += time.perf_counter() - t0
        state.train_cpu_seconds += time.process_time() - cpu0
        state.batch_in_epoch = i + 1
        if not ok:
            return self.skipped()
        state.nonfinite_run = 0
        if exploded(metrics["weight_norm_before"], metrics["weight_norm"]):
            # Finite but useless weights: stop before anything is trained on them or checkpointed.
            self.stop_reason = (
                f"the update of step {state.step + 1} multiplied the trainable weights' norm by "
                f"{metrics['weight_norm'] / max(metrics['weight_norm_before'], 1e-12):.3g} (to "
                f"{metrics['weight_norm']:.3g}); stopped, {self.kept()} (lower optim.lr?)")
            return False
        images_now = cfg.train.batch_size * self.world
        state.step += 1
        state.images_seen += images_now
        self.window_images += images_now
        step = state.step
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            self.log_step(metrics)
        evaluate_now = bool(cfg.train.eval_every) and step % cfg.train.eval_every == 0 and step < cfg.train.steps
        if evaluate_now and self.rank == 0:
            self.evaluate(step)
            say(f"step {step} mIoU: {100 * state.miou_last:.2f}")
        if step % cfg.train.checkpoint_every == 0 and step < cfg.train.steps:
            self.report(self.last, with_checkpoint=True)
        elif evaluate_now:
            self.report(self.last, with_checkpoint=False)
        return True

    def skipped(self) -> bool:
        """Count a non-finite step (skipped on every worker); False once too many came in a row."""
        state = self.state
        state.nonfinite_total += 1
        state.nonfinite_run += 1
        message = (f"step {state.step}: non-finite loss or gradient, step skipped "
                   f"({state.nonfinite_run} in a row)")
        if self.rank == 0:
            say(message, warning=True)
        self.runlog.warning(state.step, message)
        if state.nonfinite_run >= self.cfg.train.max_nonfinite:
            self.stop_reason = (f"{state.nonfinite_run} consecutive non-finite steps at step {state.step}; "
                                f"stopped, {self.kept()} (lower optim.lr?)")
            return False
        return True

    def kept(self) -> str:
        """What a stop leaves to resume from."""
        return (f"the last good checkpoint (step {self.last_good}) is intact" if self.last_good is not None
                else "no checkpoint had been written yet, so there is none to resume from")

    def log_step(self, metrics: dict[str, float]) -> None:
        """Average the step's metrics over the workers and log them; warn once per target problem after warm-up."""
        cfg, step = self.cfg, self.state.step
        elapsed = time.perf_counter() - self.window_t
        last = _mean_across_workers({k: v for k, v in metrics.items() if k != "weight_norm_before"}, self.device)
        group = self.optimizer.param_groups[0]
        last.update(lr=group["lr"], weight_decay=group["weight_decay"],
                    images_per_s=self.window_images / max(elapsed, 1e-9))
        self.last = last
        self.window_t, self.window_images = time.perf_counter(), 0
        self.runlog.write(step, last)
        if self.rank != 0:
            return
        terms = " ".join(f"{k}={last[k]:.3f}" for k in TERMS if k in last)
        entropy = " ".join(f"{k}={last[f'teacher_entropy_{k}']:.2f}" for k in TERMS if f"teacher_entropy_{k}" in last)
        say(f"step {step}/{cfg.train.steps} loss={last['loss']:.3f} {terms} teacher entropy/ln K: {entropy} "
            f"lr={last['lr']:.2e} {last['images_per_s']:.1f} img/s")
        # Targets are judged once the teacher temperature and the lr have warmed up.
        if step < max(cfg.loss.teacher_temp_warmup_steps, cfg.optim.warmup_steps):
            return
        for key, message in target_warnings(last).items():
            if key not in self.warned:
                self.warned.add(key)
                say(f"step {step}: {message}", warning=True)
                self.runlog.warning(step, f"step {step}: {message}")

    def with_state(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """``metrics`` plus the loop's counters, as Ray's reports and the closing record carry them."""
        s = self.state
        return {**metrics, "step": s.step, "miou": s.miou_last, "miou_before": s.miou_before,
                "images_seen": s.images_seen, "nonfinite_steps": s.nonfinite_total}

    def report(self, metrics: dict[str, Any], with_checkpoint: bool) -> None:
        """``ray.train.report`` the metrics, with a checkpoint of everything that trains if asked and finite."""
        import ray.train

        payload = self.with_state(metrics)
        if with_checkpoint and not all(bool(torch.isfinite(p).all()) for p in self.model.trainable_parameters()):
            # An update that overflowed: keep the last good checkpoint rather than overwrite it.
            if self.rank == 0:
                say(f"step {self.state.step}: non-finite weights, checkpoint not written", warning=True)
            with_checkpoint = False
        if not with_checkpoint:
            ray.train.report(payload)
            return
        self.last_good = self.state.step
        rngs: list[Any] = [None] * self.world
        if dist.is_available() and dist.is_initialized():
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if self.rank == 0:
                save_checkpoint(tmp, {"model": model_state(self.model), "optimizer": self.optimizer.state_dict(),
                                      "loop": asdict(self.state), "rng": rngs})
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(payload, checkpoint=ckpt)

    def finish(self) -> None:
        """Evaluate and export (rank 0, unless stopped), write the closing record and the final report."""
        state, model = self.state, self.model
        final: dict[str, Any] = dict(self.last)
        if self.stop_reason:
            state.miou_last = float("nan")  # nothing was evaluated after the stop: no after-value
        if self.rank == 0:
            if not self.stop_reason:
                self.export()
            final.update(trainable_params=sum(p.numel() for p in model.trainable_parameters()),
                         backbone_params=sum(p.numel() for p in model.backbone.parameters()),
                         train_seconds=state.train_seconds, train_cpu_seconds=state.train_cpu_seconds,
                         train_peak_mb=self.train_peak_mb if math.isfinite(self.train_peak_mb) else None)
        # A finished run's closing report below writes the final checkpoint; a stopped run's writes none.
        final.update(stop_reason=self.stop_reason, done=1,
                     last_good_step=self.last_good if self.stop_reason else state.step)
        # Ray's Result keeps the metrics of the last *checkpoint*; a run stopped by non-finite
        # steps ends without one, so the closing record also goes to metrics.jsonl.
        self.runlog.end({**self.with_state(final), "worker_nodes": self.nodes})
        self.runlog.close()
        self.report(final, with_checkpoint=not self.stop_reason)

    def export(self) -> None:
        """The final evaluation and the two exports of the adapted student (rank 0)."""
        from glare.weights.export import save_export

        assert self.run_dir is not None
        self.evaluate(self.state.step)
        say(f"mIoU after: {100 * self.state.miou_last:.2f} (before {100 * self.state.miou_before:.2f})")
        adapted = self.model.export("student")
        save_export(adapted, self.run_dir / "export" / "backbone.safetensors", self.cfg.model)
        save_export(adapted, self.run_dir / "export" / "backbone_mmseg.safetensors", self.cfg.model, layout="mmseg")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``config`` = {"cfg": dict, "run_dir": str}."""
    run = WorkerRun(config)
    run.start()
    run.train()
    run.finish()
