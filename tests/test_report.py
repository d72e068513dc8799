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


def test_report_tables_print_layers_as_whole_numbers():
    import pandas as pd

    from latent_hops.report import _table

    page = _table(pd.DataFrame({"first_hop_layer": [6.0, 2.5], "rate": [0.125, 1.0]}))
    assert "<td>6</td>" in page and "<td>2.500</td>" in page and "<td>0.125</td>" in page and "6.000" not in page


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM and DRIVER) and os.environ.get("CI") != "true",
                    reason="needs Debian chromium + chromium-driver (.ci/run installs them)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
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
        sections = driver.find_elements(By.TAG_NAME, "section")
        titles = [s.find_element(By.TAG_NAME, "h2").text for s in sections]
        assert titles[0] == "Dataset and hop accuracies" and "Patchscopes" in titles
        for i, (section, title) in enumerate(zip(sections, titles)):  # one picture per section, as read
            driver.execute_script("arguments[0].scrollIntoView()", section)
            slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
            assert section.screenshot(str(artifacts / f"report-{i:02d}-{slug}.png"))
        scopes = sections[titles.index("Patchscopes")]
        # the toy's Patchscopes reads nothing: a reader sees the warning above its 0% heatmaps
        assert "reads nothing on this model" in scopes.text
    finally:
        driver.quit()


def _section(page: str, title: str) -> str:
    return page.split(f"<h2>{title}</h2>", 1)[1].split("<section>", 1)[0]


def test_patchscopes_that_read_nothing_are_flagged_where_drawn(report, tmp_path):
    import pandas as pd

    from latent_hops.analyses.patchscopes import reads_nothing
    from latent_hops.report import build_report
    from latent_hops.rundir import made_by_of, write_table

    run = report.parent
    scopes = pd.read_parquet(run / "patchscope.parquet")
    assert reads_nothing(scopes)  # on the toy every patched generation is one string per target layer
    section = _section(report.read_text(), "Patchscopes")
    assert section.index("Warning: Patchscopes reads nothing") < section.index('id="figure-')

    # the same table with one generation that depends on the source layer: no warning
    other = tmp_path / "run"
    other.mkdir()
    for name in ("evaluation.parquet", "patchscope.parquet"):
        (other / name).write_bytes((run / name).read_bytes())
    scopes.loc[0, "generation"] += " (changed)"
    write_table(scopes, other / "patchscope.parquet", made_by_of(run / "patchscope.parquet"))
    assert not reads_nothing(scopes)
    assert "reads nothing" not in _section(build_report(other).read_text(), "Patchscopes")


def test_heatmap_scale_follows_its_panel_and_prints_values():
    import pandas as pd

    from latent_hops.analyses.backpatch import backpatch_heatmap

    cells = pd.DataFrame([dict(split="all", subset="incorrect", position="t1", kind="back", source_layer=s,
                               target_layer=t, cases=100, successes=s - t, rate=(s - t) / 100)
                          for s in range(4) for t in range(s)])
    trace = backpatch_heatmap(cells, "incorrect", "t1").data[0]
    assert trace.zmax == 3.0 and trace.zmin == 0  # a 0-3% panel uses its own range ...
    assert "0–3" in trace.colorbar.title.text  # ... and says so
    assert trace.texttemplate == "%{z:.0f}"


def test_figures_carry_the_numbers_of_their_tables():
    import pandas as pd

    from latent_hops.analyses.backpatch import backpatch_heatmap
    from latent_hops.analyses.knockout import knockout_curves
    from latent_hops.analyses.stages import stage_boxplot

    cells = pd.DataFrame([dict(split="all", subset="incorrect", position="t1", kind="back", source_layer=s,
                               target_layer=t, cases=10, successes=s + t, rate=(s + t) / 10)
                          for s in range(4) for t in range(s)])
    trace = backpatch_heatmap(cells, "incorrect", "t1").data[0]
    assert trace.z[3][1] == 40.0 and trace.z[2][0] == 20.0  # row = source layer, column = target layer
    assert pd.isna(trace.z[0][3])  # not a back-patch: grey

    stages = pd.DataFrame({"id": list("abc"), "subset": ["correct", "correct", "incorrect"], "split": "test",
                           "method": "probe", "first_hop_layer": [1.0, 2.0, 5.0], "info_propagation_layer": 3.0,
                           "second_hop_onset_layer": 4.0, "second_hop_layer": [6.0, 7.0, 8.0],
                           "prediction_extracted_layer": 7.0})
    box = stage_boxplot(stages, "probe")
    correct = box.data[0]
    first = [y for x, y in zip(correct.x, correct.y) if x.startswith("first hop resolved")]
    assert sorted(first) == [1.0, 2.0] and "n=2" in correct.name

    knockout = pd.DataFrame({"id": list("ababc"), "preset": "last_to_t1", "window_center": [0, 0, 1, 1, 0],
                             "changed": pd.array([True, False, True, True, None], dtype="boolean"),
                             "skip_reason": [None, None, None, None, "no r1 tokens"]})
    evaluation = pd.DataFrame({"id": ["a", "b", "c"], "subset": "incorrect"})
    curve = knockout_curves(knockout, evaluation).data[0]
    assert list(curve.x) == [0, 1] and list(curve.y) == [50.0, 100.0]  # the skipped case is not counted


def test_stage_boxplot_keeps_every_stage_in_order_with_its_n():
    import pandas as pd

    from latent_hops.analyses.stages import STAGE_LABELS, stage_boxplot

    stages = pd.DataFrame({"id": list("abc"), "subset": ["correct", "correct", "incorrect"], "split": "test",
                           "method": "logit_lens", "first_hop_layer": [float("nan")] * 3,  # never reached
                           "info_propagation_layer": [-1.0, 0.0, 0.0], "second_hop_onset_layer": [4.0, None, 5.0],
                           "second_hop_layer": [6.0, 7.0, 8.0], "prediction_extracted_layer": 7.0})
    fig = stage_boxplot(stages, "logit_lens")
    order = list(fig.layout.xaxis.categoryarray)
    assert [label.split("<br>")[0] for label in order] == list(STAGE_LABELS.values())  # fixed, none dropped
    assert order[0].endswith("n = 0 | 0") and order[2].endswith("n = 1 | 1") and order[3].endswith("n = 2 | 1")
    ticks = dict(zip(fig.layout.yaxis.tickvals, fig.layout.yaxis.ticktext))
    assert ticks == {-1: "emb", 0: "0", 1: "1", 2: "2", 3: "3", 4: "4", 5: "5", 6: "6", 7: "7", 8: "8"}
    assert list(fig.layout.xaxis.range) == [-0.5, 4.5]  # empty stages keep their place on the axis


def test_resolution_curves_one_panel_per_hop_one_colour_per_method():
    import pandas as pd

    from latent_hops.analyses.stages import resolution_curves

    rows = [dict(id=f"{m}{i}", subset=s, split="test", method=m, first_hop_layer=float(i), second_hop_layer=float(i + 2))
            for m in ("logit_lens", "probe", "patchscope") for s in ("correct", "incorrect") for i in (-1, 1)]
    fig = resolution_curves(pd.DataFrame(rows))
    assert len(fig.data) == 12
    colours = {t.legendgroup.split(",")[0]: t.line.color for t in fig.data}
    assert len(set(colours.values())) == 3  # methods are told apart by colour ...
    assert {t.line.dash for t in fig.data if "incorrect" in t.name} == {"dash"}  # ... subsets by dash
    assert {t.xaxis for t in fig.data} == {"x", "x2"}  # first hop | second hop
    first = next(t for t in fig.data if t.name.startswith("logit_lens, correct") and t.xaxis == "x")
    assert list(first.y) == [50.0, 100.0, 100.0]  # cumulative over layers -1, 1, 3
    assert fig.layout.xaxis.ticktext[0] == "emb"


def test_patchscope_heatmap_scale_follows_its_panel():
    import pandas as pd

    from latent_hops.analyses.patchscopes import patchscope_heatmap

    scopes = pd.DataFrame([dict(id=str(i), position="t1", source_layer=s, target_layer=t,
                                decoded="e2" if (i == 0 and s == 1) else "")
                           for i in range(20) for s in (-1, 1) for t in (0, 1)])
    trace = patchscope_heatmap(scopes, "t1", "e2").data[0]
    assert trace.zmax == 5.0 and list(trace.y) == ["emb", "1"] and trace.texttemplate == "%{z:.0f}"


@pytest.mark.skipif(not CHROMIUM and os.environ.get("CI") != "true",
                    reason="needs Debian chromium (.ci/run installs it)")
def test_save_png_draws_a_figure_without_kaleido(tmp_path):
    import plotly.graph_objects as go

    import latent_hops as lh

    fig = go.Figure(go.Heatmap(z=[[0, 1], [1, 0]]), layout={"width": 300, "height": 200})
    png = lh.save_png(fig, tmp_path / "sub" / "figure.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (340, 220)  # the figure's own size (plus the window's margin)


def test_save_png_without_a_browser_says_what_to_install(tmp_path):
    import plotly.graph_objects as go

    from latent_hops.errors import InputError
    from latent_hops.plots import save_png

    with pytest.raises(InputError, match="apt-get install chromium") as caught:
        save_png(go.Figure(), tmp_path / "f.png", chromium="no-such-browser")
    assert caught.value.code == "chromium"
