"""What Optuna is told about each trial: its mIoU curve by training step, and how the trial ended.

Ray's ``OptunaSearch`` tells Optuna a trial's last reported value as its final value, however the
trial ended. ASHA stops weak trials at an early rung, and early values are not comparable with final
ones (on the main job, every trial's mIoU peaks near step 20 and falls by step 80), so a stopped trial
would look better to TPE than the trials that trained to the end. Here a trial stopped before its
last step is PRUNED (TPE ranks those below every completed one, by the step they reached), and the
intermediate values are keyed by training step rather than by Tune's report count.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.search.optuna import OptunaSearch

FINISHED = "finished"  # the key a trial's closing report carries (glare's ``done``, which Tune reserves)


class StepOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that records intermediate values by ``step`` and prunes trials stopped early."""

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id not in self._completed_trials:
            self._record(trial_id, result)

    def _record(self, trial_id: str, result: dict[str, Any] | None) -> None:
        value, step = (result or {}).get(self.metric), (result or {}).get("step")
        if not _finite(value) or step is None:
            return
        trial = self._ot_trials[trial_id]
        if int(step) not in trial.storage.get_trial(trial._trial_id).intermediate_values:
            trial.report(float(value), int(step))  # a restarted trial reports a redone step again

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        import optuna

        if trial_id in self._completed_trials or (result and result.get(FINISHED) and not error):
            super().on_trial_complete(trial_id, result, error)
            return
        # Ray would tell a failed trial's last value as final; a trial stopped by the scheduler (or one
        # ended without a value) is pruned, which Optuna records with its last intermediate value. Tune
        # hands the result that made the scheduler stop a trial only to this method, so it is recorded
        # here first: a trial stopped at step 4 is pruned with its step-4 value.
        self._record(trial_id, result)
        state = optuna.trial.TrialState.FAIL if error else optuna.trial.TrialState.PRUNED
        self._ot_study.tell(self._ot_trials[trial_id], state=state)
        self._completed_trials.add(trial_id)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
