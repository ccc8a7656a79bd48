"""What a run prints: Ray kept quiet unless ``--verbose``, and one progress bar driven from the run's metrics.jsonl.

By default the driver does not forward the Ray workers' output (``log_to_driver=False``) and
keeps Ray's own loggers at WARNING. What the user needs comes from ``metrics.jsonl``, which rank
0 writes: a thread in the driver follows it and shows a tqdm bar (step, loss, each term's teacher
entropy, images/s, ETA), or a plain line every few logged steps when stdout is not a terminal,
and prints the evaluations, the head bootstrap and every ``"warning"`` event the workers record.
Errors still reach the driver: a failed worker raises in ``trainer.fit()`` with its traceback.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

TERMS = ("glob", "reg", "loc1", "loc2")
PLAIN_LINES = 10  # about this many progress lines per run when stdout is not a terminal


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with one of the given texts."""

    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def ray_init_kwargs(verbose: bool) -> dict[str, Any]:
    """``ray.init`` arguments for the console level: workers' output and Ray's INFO lines only if ``verbose``."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not verbose:
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        # Ray's notice that a local instance enabled token authentication by default is no news to the
        # user; its warning that authentication is *disabled* is kept.
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
            _DropMessages("Token authentication is enabled for this Ray cluster"))
    return {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's progress bars and per-dataset INFO logs in the driver, only when ``verbose``."""
    if verbose:
        return
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # ... and its notice that they are off (we turned them off).
    logging.getLogger("ray.data._internal.progress").addFilter(_DropMessages("Progress bars disabled"))


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def _resume_offset(text: bytes) -> int:
    """Where the news starts in a log a (re)started worker has just rewritten: at the ``resume`` record
    that closes the records it kept (see ``truncate_log``); a fresh start's log starts empty."""
    at = text.rfind(b'"event": "resume"')
    return text.rfind(b"\n", 0, at) + 1 if at >= 0 else 0


class RunProgress:
    """Follows a run's metrics.jsonl from byte ``offset`` and shows it; a context manager (a daemon thread).

    Args:
        path: the run's metrics.jsonl (it may not exist yet).
        total: ``train.steps``.
        log_every: ``train.log_every`` (how often a step record appears).
        stream: where to print (a tqdm bar if it is a terminal, plain lines otherwise).
    """

    def __init__(self, path: Path, total: int, log_every: int, stream: TextIO | None = None,
                 poll_s: float = 0.5) -> None:
        self.path, self.total, self.poll_s = path, total, poll_s
        self.stream = stream or sys.stdout
        self.offset, self.start, self.inode = 0, 0, None
        if path.is_file():  # a resumed run's old records are not news; its bar starts at their last step
            self.inode = path.stat().st_ino
            text = path.read_bytes()
            self.offset = text.rfind(b"\n") + 1
            for line in text[: self.offset].decode().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "loss" in rec and "event" not in rec:
                    self.start = int(rec["step"])
        self.tty = self.stream.isatty()
        records = max(1, total // max(1, log_every))
        self.plain_every = max(1, math.ceil(records / PLAIN_LINES))  # step records between plain lines
        self.records_seen = 0
        self.bar: tqdm | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="glare-progress", daemon=True)

    def __enter__(self) -> RunProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()  # what was written after the last poll
        if self.bar is not None:
            if self.tty:
                self.bar.close()
            elif self.records_seen % self.plain_every:  # the last logged step, if its line was skipped
                self._print(self.bar.__str__())

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception as err:  # the progress display must never take the run down
                self._print(f"[glare] progress display stopped: {err}")
                return

    def _print(self, line: str) -> None:
        if self.tty and self.bar is not None:  # above the bar, which stays the last line
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def poll(self) -> None:
        """Read and show the complete lines appended since the last call."""
        if not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            inode = os.fstat(f.fileno()).st_ino
            if inode != self.inode:  # a new file: a (re)started worker wrote it, cut back to its checkpoint
                self.offset = 0 if self.inode is None else _resume_offset(f.read())
                self.inode = inode
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # a line being written is read next time
        self.offset += end
        for line in chunk[:end].decode().splitlines():
            try:
                self.show(json.loads(line))
            except json.JSONDecodeError:
                continue

    def _make_bar(self, step: int) -> tqdm:
        if self.tty:
            return tqdm(total=self.total, initial=step, desc="[glare] train", unit="step", file=self.stream,
                        dynamic_ncols=True, bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                                       "[{elapsed}<{remaining}] {postfix}")
        # Not a terminal: the same meter, printed as a plain line every few records.
        return tqdm(total=self.total, initial=step, desc="[glare] step", file=open(os.devnull, "w"),  # noqa: SIM115
                    bar_format="{desc} {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")

    def show(self, rec: dict[str, Any]) -> None:
        """Show one metrics.jsonl record: a step moves the bar, events print one line."""
        event = rec.get("event")
        if self.bar is None and (event in ("probe", "head_bootstrap") or "loss" in rec):
            self.bar = self._make_bar(self.start)  # its clock starts with training, for the rate and the ETA
        if event is None and "loss" in rec:
            step = int(rec["step"])
            self.bar.update(step - self.bar.n)
            entropy = " ".join(f"{k} {rec[f'teacher_entropy_{k}']:.2f}" for k in TERMS
                               if f"teacher_entropy_{k}" in rec)
            self.bar.set_postfix_str(f"loss {rec['loss']:.3f} · entropy/ln K {entropy} · "
                                     f"{rec.get('images_per_s', float('nan')):.1f} img/s", refresh=self.tty)
            self.records_seen += 1
            if not self.tty and (self.records_seen % self.plain_every == 0 or step >= self.total):
                self._print(self.bar.__str__())
        elif event == "probe":
            step = rec["step"]
            if step == 0:
                self._print(f"[glare] mIoU before: {_pct(rec['miou'])}")  # the data line gave the set's sizes
            elif step >= self.total:
                self._print(f"[glare] mIoU after: {_pct(rec['miou'])}")
            else:
                self._print(f"[glare] step {step} mIoU: {_pct(rec['miou'])}")
        elif event == "resume":
            if self.bar is None:
                self.start = int(rec["step"])
            self._print(f"[glare] resumed from step {rec['step']} (epoch {rec.get('epoch', 0)}, "
                        f"batch {rec.get('batch', 0)})")
        elif event == "head_bootstrap":
            tokens = rec.get("tokens") or {}
            self._print("[glare] heads bootstrapped from the init's tokens: "
                        + ", ".join(f"{name} on {n} tokens" for name, n in tokens.items()))
        elif event == "warning":
            self._print(f"[glare] warning: {rec['message']}")
