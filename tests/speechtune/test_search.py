import optuna
from optuna.distributions import FloatDistribution
from optuna.study import StudyDirection
from optuna.trial import TrialState, create_trial

from speechtune.search import BoundedHistorySampler


def grown_study(n, best_at):
    """A study grown one trial at a time, the way the sampler sees it between asks."""
    sampler = BoundedHistorySampler(optuna.samplers.TPESampler(seed=0), window=40, elite=10)
    trials, windows = [], []
    for number in range(n):
        value = 0.01 if number == best_at else 0.5 + (number % 7) / 100
        trial = create_trial(params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)}, value=value)
        trial.number = number
        trials.append(trial)
        windows.append(sampler.select(list(trials), StudyDirection.MINIMIZE))
    return trials, windows


def test_small_studies_are_seen_whole():
    trials, windows = grown_study(30, best_at=3)
    assert windows[-1] == trials


def test_large_studies_are_cut_to_the_window_but_keep_the_best():
    trials, windows = grown_study(500, best_at=17)
    last = windows[-1]
    assert len(last) <= 40
    assert 17 in {t.number for t in last}, "the best trial stays in the window long after it left the tail"
    assert {t.number for t in last} >= set(range(470, 500)), "the most recent trials are in the window"


def test_running_trials_near_the_end_stay_visible():
    sampler = BoundedHistorySampler(optuna.samplers.TPESampler(seed=0), window=40, elite=10)
    trials = []
    for number in range(200):
        state = TrialState.RUNNING if number >= 195 else TrialState.COMPLETE
        trial = create_trial(params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)},
                             value=None if state == TrialState.RUNNING else 0.5, state=state)
        trial.number = number
        trials.append(trial)
    window = sampler.select(trials, StudyDirection.MINIMIZE)
    assert [t.number for t in window if t.state == TrialState.RUNNING] == [195, 196, 197, 198, 199]
