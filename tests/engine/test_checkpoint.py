"""A training checkpoint round trip (no Ray): model, optimiser, loop counters and RNG come back exactly."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from glare.engine.checkpoint import STATE_FILE, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from glare.engine.loop import LoopState, build_optimizer, load_model_state, model_state, set_schedules
from glare.engine.schedules import teacher_momentum, teacher_temp
from glare.models import build_model


def _trained(cfg, steps: int):
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = build_optimizer(model, cfg, world_size=1)
    for step in range(steps):
        set_schedules(opt, cfg, step, world_size=1)
        model.forward_backward(torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8), teacher_temp(cfg, step))
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_teacher(teacher_momentum(cfg, step))
    return model, opt


def test_round_trip_restores_training_exactly(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    model, opt = _trained(cfg, steps=2)
    loop = LoopState(step=2, images_seen=8, epoch=1, batch_in_epoch=3, miou_before=0.25, miou_last=0.5)
    torch.manual_seed(7)
    save_checkpoint(tmp_path, {"model": model_state(model), "optimizer": opt.state_dict(), "loop": asdict(loop),
                               "rng": [rng_state()]})
    assert (tmp_path / STATE_FILE).is_file() and not (tmp_path / (STATE_FILE + ".tmp")).exists()
    expected_draw = torch.rand(3)

    saved = load_checkpoint(tmp_path)
    fresh, fresh_opt = _trained(cfg, steps=0)
    load_model_state(fresh, saved["model"])
    fresh_opt.load_state_dict(saved["optimizer"])
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"] == 2
    assert LoopState(**saved["loop"]) == loop
    torch.manual_seed(99)
    set_rng_state(saved["rng"][0])
    assert torch.equal(torch.rand(3), expected_draw)  # the same random stream continues

    # Both copies take the same next step.
    for m, o in ((model, opt), (fresh, fresh_opt)):
        torch.manual_seed(5)
        set_schedules(o, cfg, 2, world_size=1)
        m.forward_backward(torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8), teacher_temp(cfg, 2))
        o.step()
    for key, value in model.student.state_dict().items():
        assert torch.equal(fresh.student.state_dict()[key], value), key


def test_missing_checkpoint_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_checkpoint(tmp_path)
