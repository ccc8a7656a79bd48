"""tune/searcher.py: what Optuna learns from finished, stopped and failed trials."""

from __future__ import annotations

import optuna
import pytest

from tune.searcher import FINISHED, StepOptunaSearch


@pytest.fixture
def searcher() -> StepOptunaSearch:
    space = {"optim.lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)}
    return StepOptunaSearch(space=space, metric="miou", mode="max", sampler=optuna.samplers.RandomSampler(seed=0),
                            study_name="s", storage=optuna.storages.InMemoryStorage())


def _report(searcher: StepOptunaSearch, trial_id: str, curve: dict[int, float]) -> dict:
    assert "optim.lr" in searcher.suggest(trial_id)
    result: dict = {}
    for i, (step, miou) in enumerate(curve.items(), start=1):
        result = {"miou": miou, "step": step, "training_iteration": i}
        searcher.on_trial_result(trial_id, result)
    return result


def test_a_stopped_trial_is_pruned_and_never_the_best(searcher):
    # Like the main job: the stopped trials' early values are above the finished trial's final value.
    # As in Tune, the result on which the scheduler stops a trial reaches only on_trial_complete.
    searcher.suggest("a")
    searcher.on_trial_complete("a", {"miou": 0.79, "step": 20, "training_iteration": 1})
    done = _report(searcher, "b", {20: 0.78, 40: 0.775, 80: 0.77})
    searcher.on_trial_complete("b", {**done, FINISHED: 1})
    _report(searcher, "c", {20: 0.785})
    searcher.on_trial_complete("c", {"miou": 0.78, "step": 40, "training_iteration": 2})
    a, b, c = searcher._ot_study.trials
    assert [t.state.name for t in (a, b, c)] == ["PRUNED", "COMPLETE", "PRUNED"]
    # Optuna keeps a pruned trial's last intermediate value as its value: the one it was stopped on.
    assert (a.intermediate_values, a.value) == ({20: 0.79}, 0.79)
    assert (c.intermediate_values, c.value) == ({20: 0.785, 40: 0.78}, 0.78)
    # Intermediate values are keyed by training step, not by the count of reports.
    assert b.intermediate_values == {20: 0.78, 40: 0.775, 80: 0.77} and b.value == 0.77
    assert searcher._ot_study.best_trial.number == 1


def test_a_redone_step_is_reported_once_and_failures_stay_failures(searcher):
    result = _report(searcher, "a", {20: 0.7, 40: 0.72})
    searcher.on_trial_result("a", {"miou": 0.71, "step": 40, "training_iteration": 3})  # after a restart
    searcher.on_trial_result("a", {"miou": float("nan"), "step": 60, "training_iteration": 4})
    searcher.on_trial_complete("a", {**result, FINISHED: 1})
    _report(searcher, "b", {20: 0.6})
    searcher.on_trial_complete("b", {"miou": 0.6, "step": 20}, error=True)
    searcher.suggest("c")
    searcher.on_trial_complete("c", None)  # an invalid point: ended without a result
    a, b, c = searcher._ot_study.trials
    assert (a.state.name, a.value, a.intermediate_values) == ("COMPLETE", 0.72, {20: 0.7, 40: 0.72})
    assert b.state.name == "FAIL" and c.state.name == "PRUNED"
