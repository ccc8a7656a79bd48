"""Warnings about the teacher's targets: near-uniform and collapsed, per term, with the fix named."""

from __future__ import annotations

from glare.engine.health import target_warnings


def test_healthy_targets_give_no_warning():
    metrics = {"loss": 20.0, "teacher_entropy_glob": 0.5, "batch_entropy_glob": 0.9,
               "teacher_entropy_loc1": 0.95, "batch_entropy_loc1": 0.1}  # both thresholds are exclusive
    assert target_warnings(metrics) == {}


def test_uniform_and_collapsed_terms_are_named_with_their_fix():
    metrics = {"teacher_entropy_glob": 0.97, "batch_entropy_glob": 0.99,
               "teacher_entropy_reg": 0.02, "batch_entropy_reg": 0.03,
               "teacher_entropy_loc2": 0.6, "batch_entropy_loc2": 0.8}
    found = target_warnings(metrics)
    assert set(found) == {"glob:uniform", "reg:collapsed"}
    assert "L_glob" in found["glob:uniform"] and "0.97 ln K" in found["glob:uniform"]
    assert "model.head_init" in found["glob:uniform"] and "loss.teacher_temp" in found["glob:uniform"]
    assert "L_reg" in found["reg:collapsed"] and "0.03 ln K" in found["reg:collapsed"]
    assert "optim.lr" in found["reg:collapsed"]


def test_an_update_that_multiplies_the_norm_has_exploded():
    from glare.engine.health import EXPLODED, exploded

    assert not exploded(10.0, 10.5) and not exploded(10.0, 9.0)  # an ordinary step
    assert exploded(10.0, 10.0 * EXPLODED + 1e-3) and exploded(10.0, 1e13) and exploded(10.0, float("inf"))
    assert exploded(10.0, float("nan"))
