"""report.html: self-contained, and it renders in a real headless Chromium with no JS errors."""

import os
import re
import shutil
from pathlib import Path

import pytest

from latent_hops.cli import main

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    common = ["--out", str(out), "--split", "test_id", "--max-cases", "3", "--device", "cpu"]
    assert main(["backpatch", *common]) == 0
    assert main(["stages", *common, "--probe-train", "200"]) == 0
    assert main(["report", str(out)]) == 0
    return out / "report.html"


def test_report_is_self_contained(report):
    page = report.read_text()
    assert not re.search(r"<script[^>]*\bsrc=", page)  # no external script: plotly.js is inline, works offline
    assert "plotly.js v" in page or "Plotly" in page
    assert page.count('id="figure-') >= 8  # 4 heatmaps, 3 stage boxplots, curves, Patchscopes, knockout
    for heading in ("Dataset and hop accuracies", "Back-patching", "Stages of two-hop queries", "Patchscopes"):
        assert heading in page


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM and DRIVER) and os.environ.get("CI") != "true",
                    reason="needs Debian chromium + chromium-driver (.ci/run installs them)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1300,2000"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        driver.get(report.as_uri())
        count = "return document.querySelectorAll('[id^=\"figure-\"]').length"
        rendered = ("return [...document.querySelectorAll('[id^=\"figure-\"]')]"
                    ".filter(d => d.querySelector('svg.main-svg, canvas')).length")
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(rendered) == d.execute_script(count))
        assert driver.execute_script(count) >= 8
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
        artifacts = ROOT / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(artifacts / "report.png"))
    finally:
        driver.quit()


def test_heatmap_scale_follows_its_panel_and_prints_values():
    import pandas as pd

    from latent_hops import plots

    cells = pd.DataFrame([dict(split="all", subset="incorrect", position="t1", kind="back", source_layer=s,
                               target_layer=t, cases=100, successes=s - t, rate=(s - t) / 100)
                          for s in range(4) for t in range(s)])
    trace = plots.backpatch_heatmap(cells, "incorrect", "t1").data[0]
    assert trace.zmax == 3.0 and trace.zmin == 0  # a 0-3% panel uses its own range ...
    assert "0–3" in trace.colorbar.title.text  # ... and says so
    assert trace.texttemplate == "%{z:.0f}"


def test_figures_carry_the_numbers_of_their_tables():
    import pandas as pd

    from latent_hops import plots

    cells = pd.DataFrame([dict(split="all", subset="incorrect", position="t1", kind="back", source_layer=s,
                               target_layer=t, cases=10, successes=s + t, rate=(s + t) / 10)
                          for s in range(4) for t in range(s)])
    trace = plots.backpatch_heatmap(cells, "incorrect", "t1").data[0]
    assert trace.z[3][1] == 40.0 and trace.z[2][0] == 20.0  # row = source layer, column = target layer
    assert pd.isna(trace.z[0][3])  # not a back-patch: grey

    stages = pd.DataFrame({"id": list("abc"), "subset": ["correct", "correct", "incorrect"], "split": "test",
                           "method": "probe", "first_hop_layer": [1.0, 2.0, 5.0], "info_propagation_layer": 3.0,
                           "second_hop_onset_layer": 4.0, "second_hop_layer": [6.0, 7.0, 8.0],
                           "prediction_extracted_layer": 7.0})
    box = plots.stage_boxplot(stages, "probe")
    correct = box.data[0]
    first = [y for x, y in zip(correct.x, correct.y) if x == "first hop resolved"]
    assert sorted(first) == [1.0, 2.0] and "n=2" in correct.name

    knockout = pd.DataFrame({"id": list("abab"), "preset": "last_to_t1", "layer": [0, 0, 1, 1],
                             "changed": [True, False, True, True], "skip_reason": ""})
    evaluation = pd.DataFrame({"id": ["a", "b"], "subset": "incorrect"})
    curve = plots.knockout_curves(knockout, evaluation).data[0]
    assert list(curve.x) == [0, 1] and list(curve.y) == [50.0, 100.0]
