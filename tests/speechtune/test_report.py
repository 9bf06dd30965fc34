"""`speechtune report` (issue 18): the report of a real study, in a real browser, its PNGs, its edge cases;
and optuna-dashboard as a tested client of the storage our engine writes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from speechtune import studyreport
from tests.speechtune.test_cli import EXAMPLES, speechtune, write_study
from tests.support.browser import open_page

BLANK = 0.012  # pixel variance (RGB in 0..1) below which a PNG counts as blank; the figures here measure 0.016 to 0.11
LADDER_FIGURES = ("history", "compute", "curves", "ladder", "importances", "parallel", "validation")


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    """examples/fake-ladder.yaml run by `speechtune run`, as a user would: its folder and the run's output."""
    folder = tmp_path_factory.mktemp("fake-ladder")
    result = speechtune("run", str(EXAMPLES / "fake-ladder.yaml"), cwd=folder, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return folder, result


def _report(folder: Path, study: str, out: str = "report", storage: str | None = None):
    return speechtune("report", study, "--storage", storage or f"sqlite:///{folder}/{study}.db", "--out", str(folder / out), cwd=folder)


def test_run_writes_the_report_into_its_workdir_and_prints_its_path(ladder):
    folder, result = ladder
    page = folder / ".speechtune" / "fake-ladder" / "report" / "index.html"
    assert f"report: {page}" in result.stdout.replace("\n", ""), result.stdout[-2000:]
    assert page.stat().st_size > 50_000
    assert {p.name for p in page.parent.glob("*.png")} == {f"{name}.png" for name in LADDER_FIGURES}


def test_the_ladder_report_in_a_real_browser_has_every_figure_no_request_and_no_console_error(ladder):
    folder, _ = ladder
    result = _report(folder, "fake-ladder")
    assert result.returncode == 0, result.stdout + result.stderr
    page_path = folder / "report" / "index.html"
    script = """(() => {
      const out = {};
      for (const section of document.querySelectorAll('section.figure-card')) {
        const img = section.querySelector('img');
        out[section.id] = {state: section.dataset.state, text: section.innerText.trim(),
                           width: img ? img.naturalWidth : 0, height: img ? img.naturalHeight : 0,
                           shown: img ? img.getBoundingClientRect().width : 0, complete: img ? img.complete : false};
      }
      out.leaderboard_rows = document.querySelectorAll('#leaderboard tr').length;
      return out;
    })()"""
    screenshot = folder / "report" / "screenshot.png"
    page = open_page(page_path.as_uri(), screenshot, script)
    figures = page.result
    for name in LADDER_FIGURES:
        assert figures[name]["state"] == "drawn", (name, figures[name]["text"])
        assert figures[name]["complete"] and figures[name]["width"] >= 300 and figures[name]["height"] >= 200, (name, figures[name])
        assert figures[name]["shown"] > 200, (name, figures[name])
    assert figures["failures"]["state"] == "missing" and "No failed trials" in figures["failures"]["text"]
    assert figures["leaderboard_rows"] == 1 + 50  # the head and the top 50 of 64 configurations
    assert "ρ" in figures["ladder"]["text"] and "PED-ANOVA" in figures["importances"]["text"]
    # no network: the document itself, then only data: URIs
    assert page.requests[0] == page_path.as_uri()
    assert [url for url in page.requests[1:] if not url.startswith("data:image/png;base64,")] == []
    assert len(page.requests) == 1 + len(LADDER_FIGURES)
    assert page.errors() == []
    from matplotlib.image import imread

    pixels = imread(screenshot)
    assert pixels.shape[0] > 2000 and pixels.std() > 0.05  # the whole page, not a blank viewport


def test_the_browser_check_catches_a_request_and_a_console_error(tmp_path):
    """The harness itself can fail: a page that fetches and logs an error is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="http://127.0.0.1:9/x.png"><script>console.error("boom")</script></body></html>')
    page = open_page(bad.as_uri(), tmp_path / "bad.png")
    assert "http://127.0.0.1:9/x.png" in page.requests
    assert any(entry["text"] == "boom" for entry in page.errors())


def _captured_figures(study: optuna.Study, out: Path, monkeypatch) -> dict[str, object]:
    """Every matplotlib figure the report draws, by its id, kept for inspection."""
    figures: dict[str, object] = {}
    drawing: list[str] = []
    original = studyreport._png

    def keep(fig):
        figures[drawing[-1]] = fig
        return original(fig)

    monkeypatch.setattr(studyreport, "_png", keep)
    for figure_id, function in list(studyreport._DRAW.items()):
        def wrapped(data, figure, function=function, figure_id=figure_id):
            drawing.append(figure_id)
            function(data, figure)

        monkeypatch.setitem(studyreport._DRAW, figure_id, wrapped)
    studyreport.write(study, out)
    return figures


def test_every_png_is_not_blank_and_every_axis_is_labelled(ladder, tmp_path, monkeypatch):
    from matplotlib.image import imread

    folder, _ = ladder
    study = studyreport.load_study("fake-ladder", f"sqlite:///{folder}/fake-ladder.db")
    figures = _captured_figures(study, tmp_path, monkeypatch)
    assert set(figures) == set(LADDER_FIGURES)
    for figure_id, fig in figures.items():
        for ax in fig.axes:
            if hasattr(ax, "_colorbar"):
                assert ax.get_ylabel(), f"{figure_id}: the colour bar has no label"
                continue
            assert ax.get_xlabel() and ax.get_ylabel(), f"{figure_id}: axes without a label"
        pixels = imread(tmp_path / f"{figure_id}.png")
        assert pixels.shape[0] >= 200 and pixels.shape[1] >= 300, figure_id
        assert pixels[..., :3].var() > BLANK, f"{figure_id}.png is blank: pixel variance {pixels[..., :3].var():.4f}"
    # the bound is one that a drawn but empty figure fails: labelled axes, ticks, no data (0.009)
    from matplotlib.figure import Figure

    blank = Figure(figsize=(7, 3.6), layout="constrained")
    ax = blank.add_subplot()
    ax.set_xlabel("trial number")
    ax.set_ylabel("wer")
    blank.savefig(tmp_path / "blank.png")
    assert imread(tmp_path / "blank.png")[..., :3].var() < BLANK


def _study(tmp_path: Path, name: str, trials: list) -> str:
    url = f"sqlite:///{tmp_path}/{name}.db"
    study = optuna.create_study(study_name=name, storage=url)
    study.set_user_attr("objective", "wer")
    if trials:
        study.add_trials(trials)
    return url


def _trial(state: TrialState, value=None, steps=(), reason: str | None = None):
    return create_trial(state=state, value=value, params={"lr": 1e-3}, distributions={"lr": FloatDistribution(1e-5, 1e-2, log=True)},
                        intermediate_values={step: 1.0 / (step + 1) for step in steps},
                        user_attrs={"fail_reason": reason} if reason else {})


@pytest.mark.parametrize(("name", "trials", "expected"), [
    ("empty", [], ["This study has no trials yet", "No complete trial yet (no trials yet)", "No learning curves",
                   "Parameter importances need at least 2 complete trials; this study has 0", "No trials yet."]),
    ("only-failed", [_trial(TrialState.FAIL, reason="Error"), _trial(TrialState.FAIL, reason="Error"), _trial(TrialState.FAIL, reason="NaN")],
     ["No trial has completed", "No complete trial yet (fail 3)", "No learning curves", "3 failed trials"]),
    ("in-progress", [_trial(TrialState.RUNNING, steps=(0, 1, 2)), _trial(TrialState.RUNNING, steps=(0,))],
     ["In progress: 2 trial(s) running", "No complete trial yet (running 2)", "2 of 2 trials reported intermediate values"]),
    ("no-curves", [_trial(TrialState.COMPLETE, value=0.3), _trial(TrialState.COMPLETE, value=0.2)],
     ["No learning curves: no trial reported an intermediate value", "Best wer 0.2 at trial 1", "Not a fidelity study"]),
])
def test_edge_cases_render_and_say_what_is_missing(tmp_path, name, trials, expected):
    url = _study(tmp_path, name, trials)
    result = speechtune("report", name, "--storage", url, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    page = (tmp_path / "out" / "index.html").read_text()
    for text in expected:
        assert text in page, text
    for figure_id, _ in studyreport.FIGURES:
        assert f'id="{figure_id}"' in page  # every section is there, drawn or saying why not


def test_a_missing_study_or_storage_exits_2_naming_it(tmp_path):
    url = _study(tmp_path, "present", [])
    result = speechtune("report", "absent", "--storage", url, cwd=tmp_path)
    assert result.returncode == 2 and "no study 'absent'" in result.stdout and "present" in result.stdout
    result = speechtune("report", "x", "--storage", f"sqlite:///{tmp_path}/nowhere.db", cwd=tmp_path)
    assert result.returncode == 2 and "nowhere.db does not exist" in result.stdout
    assert not (tmp_path / "nowhere.db").exists()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    result = speechtune("report", "x", "--storage", f"postgresql+psycopg://u:secret@127.0.0.1:{port}/db", cwd=tmp_path)
    assert result.returncode == 2 and f"127.0.0.1:{port}/db" in result.stdout and "secret" not in result.stdout


def test_without_matplotlib_the_report_says_how_to_get_it(tmp_path):
    url = _study(tmp_path, "s", [])
    code = ("import sys; sys.modules['matplotlib'] = None\n"  # as if not installed: its import raises ImportError
            "from speechtune.cli import main\n"
            f"sys.exit(main(['report', 's', '--storage', {url!r}]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "pip install 'speechtune[report]'" in result.stdout


# -- optuna-dashboard, a client of our storage ---------------------------------------------------


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _dashboard_sees(storage: str, study_name: str, tmp_path: Path, states: set[TrialState]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dashboard = Path(sys.executable).with_name("optuna-dashboard")
    log = (tmp_path / f"dashboard-{port}.log").open("w")
    process = subprocess.Popen([str(dashboard), storage, "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                studies = _get(f"{base}/api/studies")["study_summaries"]
                break
            except (urllib.error.URLError, ConnectionError):
                assert process.poll() is None and time.monotonic() < deadline, (tmp_path / f"dashboard-{port}.log").read_text()
                time.sleep(0.3)
        ours = optuna.load_study(study_name=study_name, storage=storage)
        (summary,) = [s for s in studies if s["study_name"] == study_name]
        detail = _get(f"{base}/api/studies/{summary['study_id']}")
        trials = {t["number"]: t for t in detail["trials"]}
        assert sorted(trials) == [t.number for t in ours.trials] and len(trials) > 0
        for trial in ours.trials:
            seen = trials[trial.number]
            assert seen["state"] == trial.state.name.capitalize()
            assert {p["name"]: p["param_external_value"] for p in seen["params"]} == {k: str(v) for k, v in trial.params.items()}
            assert {v["step"]: v["value"] for v in seen["intermediate_values"]} == pytest.approx(dict(trial.intermediate_values))
        assert [t["number"] for t in detail["best_trials"]] == [ours.best_trial.number]
        assert {t.state for t in ours.trials} >= states
        importances = _get(f"{base}/api/studies/{summary['study_id']}/param_importances")["param_importances"][0]
        assert {entry["name"] for entry in importances} == set(ours.best_trial.params)
        assert sum(entry["importance"] for entry in importances) == pytest.approx(1.0, abs=0.01)
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def test_optuna_dashboard_sees_a_study_our_engine_wrote_on_sqlite(ladder, tmp_path):
    folder, _ = ladder
    _dashboard_sees(f"sqlite:///{folder}/fake-ladder.db", "fake-ladder", tmp_path, {TrialState.COMPLETE, TrialState.PRUNED})


def test_optuna_dashboard_sees_a_study_our_engine_wrote_on_postgresql(postgres_url, tmp_path):
    study = write_study(tmp_path / "study.json", name="dashboard-pg", max_trials=8, storage=postgres_url)
    result = speechtune("run", str(study), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    _dashboard_sees(postgres_url, "dashboard-pg", tmp_path, {TrialState.COMPLETE})
