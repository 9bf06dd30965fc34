"""The report of a real NeMo study (issue 18's acceptance), in headless chromium: a 3-trial study of
1-epoch models on generated digits, in warm workers so it costs one start-up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from speechtune_trainer import cli
from tests.support.browser import open_page

pytestmark = pytest.mark.trainer
BIN = Path(sys.executable).parent  # the virtualenv's speechtune and speechtune-trainer, whatever PATH holds
FIGURES = ("history", "compute", "curves", "importances", "parallel")


def test_a_nemo_studys_report_opens_in_a_real_browser_with_its_figures_no_request_and_no_console_error(tmp_path):
    data = tmp_path / "digits"
    assert cli.main(["make-data", "--out", str(data), "--hours", "0.01", "--seed", "1", "--workers", "2"]) == 0
    study = {
        "apiVersion": "speechtune.io/v1alpha1", "kind": "SpeechTuningStudy", "metadata": {"name": "nemo-report"},
        "spec": {
            "objective": {"metric": "wer", "direction": "minimize"}, "maxTrials": 3, "parallelism": 1,
            "sampler": {"type": "random", "seed": 1}, "pruner": {"type": "none"},
            "searchSpace": [{"name": "lr", "float": {"low": 1.0e-3, "high": 5.0e-3, "log": True}},
                            {"name": "d_model", "categorical": [64, 96]}],
            "trialTemplate": {"command": [str(BIN / "speechtune-trainer"), "asr"],
                              "args": ["--data", str(data), "--accelerator", "cpu", "--threads", "1", "--num-layers", "1",
                                       "--n-mels", "40", "--epochs", "2"],
                              "workers": {"mode": "warm"}},
            "storage": {"url": f"sqlite:///{tmp_path}/nemo.db"},
        },
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    run = subprocess.run([str(BIN / "speechtune"), "run", "study.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    page_path = tmp_path / ".speechtune" / "nemo-report" / "report" / "index.html"
    assert page_path.exists(), run.stdout[-2000:]
    script = """(() => {
      const out = {};
      for (const section of document.querySelectorAll('section.figure-card')) {
        const img = section.querySelector('img');
        out[section.id] = {state: section.dataset.state, text: section.innerText.trim(),
                           width: img ? img.naturalWidth : 0, complete: img ? img.complete : false};
      }
      return out;
    })()"""
    page = open_page(page_path.as_uri(), tmp_path / "screenshot.png", script)
    for name in FIGURES:
        assert page.result[name]["state"] == "drawn" and page.result[name]["complete"], (name, page.result[name]["text"])
        assert page.result[name]["width"] >= 300, (name, page.result[name])
    assert page.result["ladder"]["state"] == "missing"  # no fidelity ladder in this study, and the page says so
    assert [url for url in page.requests[1:] if not url.startswith("data:image/png;base64,")] == []
    assert page.errors() == []
