"""The optimiser's parameter groups and schedules (no Ray)."""

from __future__ import annotations

import pytest
import torch

from glare.engine.loop import build_optimizer, set_schedules
from glare.engine.schedules import teacher_momentum, teacher_temp
from glare.models import build_model


def _heads(model) -> set[int]:
    return {id(p) for name in ("head", "local_head") for p in model.student[name].parameters()}


def test_heads_train_at_their_own_scale_and_biases_without_decay(tiny_cfg):
    cfg = tiny_cfg("optim.head_lr_scale=0.25", "optim.warmup_steps=0")
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = build_optimizer(model, cfg, world_size=1)
    lr, wd = set_schedules(opt, cfg, step=0, world_size=1)
    assert lr == pytest.approx(cfg.optim.lr * cfg.train.batch_size / 256)
    assert opt.param_groups[0]["lr"] == lr  # the first group (adapters) is what the logs show
    heads = _heads(model)
    seen = 0
    for group in opt.param_groups:
        for p in group["params"]:
            seen += 1
            assert group["lr"] == pytest.approx(lr * (0.25 if id(p) in heads else 1.0))
            assert group["weight_decay"] == (wd if p.ndim > 1 else 0.0)
    assert seen == len(model.trainable_parameters())


def test_zero_head_scale_freezes_the_heads(tiny_cfg):
    cfg = tiny_cfg("optim.head_lr_scale=0")
    torch.manual_seed(0)
    model = build_model(cfg)
    heads = _heads(model)
    assert not heads & {id(p) for p in model.trainable_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items() if "head" in k}
    opt = build_optimizer(model, cfg, world_size=1)
    set_schedules(opt, cfg, step=5, world_size=1)
    model.forward_backward(torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8), teacher_temp(cfg, 5))
    opt.step()
    model.update_teacher(teacher_momentum(cfg, 5))
    after = model.state_dict()
    assert all(torch.allclose(before[k], after[k]) for k in before)  # student and teacher heads held
    ups = [a.up.weight for a in model.student["adapters"].values()]
    assert all(u.abs().sum() > 0 for u in ups)  # ... while the adapters trained


def test_truncate_log_keeps_each_step_up_to_the_checkpoint_once(tmp_path):
    import json

    from glare.engine.loop import truncate_log

    log = tmp_path / "metrics.jsonl"
    records = [{"event": "head_bootstrap", "step": 0}, {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9},
               {"step": 2, "miou": 0.5}, {"step": 3, "loss": 0.8}, {"event": "end", "step": 3}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "lo')  # a line cut by a kill
    assert truncate_log(log, 2) == 3
    assert [json.loads(line) for line in log.read_text().splitlines()] == records[:4]
    assert truncate_log(log, -1) == 4 and log.read_text() == ""  # a fresh start under the same name
    assert truncate_log(tmp_path / "absent.jsonl", 3) == 0
    # From the final checkpoint the closing evaluation is redone: its records at that step go, the step's stays.
    closing = [{"step": 2, "loss": 0.9}, {"step": 2, "miou": 0.5}, {"event": "probe", "step": 2, "miou": 0.5},
               {"event": "end", "step": 2}]
    log.write_text("".join(json.dumps(r) + "\n" for r in closing))
    assert truncate_log(log, 2, final=True) == 3
    assert [json.loads(line) for line in log.read_text().splitlines()] == closing[:1]
    # A resume's record closes the kept ones in the same replace (a new file: a follower re-reads from it).
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    inode, note = log.stat().st_ino, {"event": "resume", "step": 2, "epoch": 0, "batch": 2}
    assert truncate_log(log, 2, note=note) == 2 and log.stat().st_ino != inode
    assert [json.loads(line) for line in log.read_text().splitlines()] == [*records[:4], note]
    absent = tmp_path / "absent2.jsonl"
    assert truncate_log(absent, 2, note=note) == 0 and json.loads(absent.read_text()) == note


def test_schedules_follow_the_step_and_the_global_batch(tiny_cfg):
    cfg = tiny_cfg("optim.warmup_steps=4", "train.steps=20", "optim.weight_decay=0.04", "optim.weight_decay_end=0.4")
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = build_optimizer(model, cfg, world_size=2)
    peak = cfg.optim.lr * cfg.train.batch_size * 2 / 256  # linear scaling: two workers double the batch
    lrs = [set_schedules(opt, cfg, step=s, world_size=2)[0] for s in range(4)]
    assert lrs == pytest.approx([peak / 4, peak / 2, 3 * peak / 4, peak])
    lr, wd = set_schedules(opt, cfg, step=20, world_size=2)
    assert lr == pytest.approx(cfg.optim.min_lr) and wd == pytest.approx(0.4)
    assert set_schedules(opt, cfg, step=0, world_size=2)[1] == pytest.approx(0.04)
    decayed = [g for g in opt.param_groups if g["apply_wd"]]
    assert decayed and all(g["weight_decay"] == pytest.approx(0.04) for g in decayed)
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups if not g["apply_wd"])


def test_a_fresh_start_over_an_earlier_attempt_says_so(tmp_path):
    import json

    from glare.engine.loop import RunLog

    def records() -> list[dict]:
        return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]

    RunLog(tmp_path).close()  # a first start: nothing to say
    assert not (tmp_path / "metrics.jsonl").exists()
    earlier = [{"event": "probe", "step": 0, "miou": 0.5}, {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in earlier))
    RunLog(tmp_path).close()  # a restart that found no checkpoint: the earlier records go, with a warning
    (warning,) = records()
    assert warning["event"] == "warning" and warning["step"] == 0
    assert "started over from step 0" in warning["message"] and "the 3 records" in warning["message"]
    RunLog(tmp_path, resume_step=2, note={"event": "resume", "step": 2}).close()  # a resume: no such warning
    assert [r["event"] for r in records()] == ["warning", "resume"]
