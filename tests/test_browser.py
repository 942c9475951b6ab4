"""In a real browser (Debian's headless Chromium driven by Selenium): report.html sorts and
shows every image from disk, and the MLflow UI lists a sweep's parent run and its children.

Skipped, with the reason, where /usr/bin/chromium, chromedriver, selenium or mlflow is
missing (`.ci/run` installs Chromium so that CI runs them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1600,1000",
]
UI_START_SECONDS = 180  # the MLflow server's start, bounded (a loaded 2-core machine takes tens of seconds)

if not CHROMIUM.is_file():
    pytest.skip(
        f"{CHROMIUM} not found: install Debian's chromium and chromium-driver (apt-get install -y chromium "
        "chromium-driver; .ci/run does) to run the browser tests",
        allow_module_level=True,
    )
if not Path(CHROMEDRIVER).is_file():
    pytest.skip(
        f"chromedriver not found at {CHROMEDRIVER}: apt-get install -y chromium-driver", allow_module_level=True
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra has it)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


# --------------------------------------------------------------------------- report.html from disk


def _run_folder(root: Path) -> Path:
    """A run folder with a confusion matrix, two learning curves and a report of 4 rows."""
    from pipeline.runs import plots, report

    run = root / "run"
    (run / "curves").mkdir(parents=True)
    plots.plot_confusion_matrix(np.array([[3, 1], [0, 4]]), ["cats", "dogs"], run / "confusion.png", "winner")
    for i in (2, 3):
        plots.plot_learning_curves(
            {"loss": [1.0, 0.5], "val_loss": [1.1, 0.7], "accuracy": [0.5, 0.8]},
            run / "curves" / f"0{i}-mlp.png",
            f"#{i}",
        )
    rows = [
        {"index": 0, "head": "logreg", "val_accuracy": 0.75, "fit_seconds": 12.5},
        {"index": 1, "head": "svm", "val_accuracy": 0.9, "fit_seconds": 3.0, "winner": True},
        {"index": 2, "head": "mlp", "val_accuracy": 0.8, "fit_seconds": 100.0},
        {"index": 3, "head": "mlp", "val_accuracy": 0.6, "fit_seconds": 9.0},
    ]
    report.sweep_report(run, rows, ["index", "head", "val_accuracy", "fit_seconds"], {"fingerprint": "x"})
    return run


def _column(driver, name: str) -> list[str]:
    headers = [th.text.strip(" ▲▼") for th in driver.find_elements(By.CSS_SELECTOR, "table.sortable th")]
    col = headers.index(name)
    return [
        tr.find_elements(By.TAG_NAME, "td")[col].text
        for tr in driver.find_elements(By.CSS_SELECTOR, "table.sortable tbody tr")
    ]


def test_report_sorts_on_a_header_click_and_shows_every_image(browser, tmp_path):
    run = _run_folder(tmp_path)
    browser.get((run / "report.html").as_uri())
    header = next(th for th in browser.find_elements(By.CSS_SELECTOR, "table.sortable th") if th.text == "fit_seconds")
    header.click()
    assert _column(browser, "fit_seconds") == ["3.0000", "9.0000", "12.5000", "100.0000"]  # numbers, not text order
    assert _column(browser, "head") == ["svm", "mlp", "logreg", "mlp"]  # whole rows move
    header.click()
    assert _column(browser, "fit_seconds") == ["100.0000", "12.5000", "9.0000", "3.0000"]
    next(th for th in browser.find_elements(By.CSS_SELECTOR, "th") if th.text == "head").click()
    assert _column(browser, "head") == ["logreg", "mlp", "mlp", "svm"]
    winner = browser.find_elements(By.CSS_SELECTOR, "tr.winner td")
    assert [td.text for td in winner][:2] == ["1", "svm"]
    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) == 3
    loaded = browser.execute_script(
        "return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0);"
    )
    assert loaded == [True, True, True]


# --------------------------------------------------------------------------- inspect.html from disk


def test_inspect_page_shows_each_flagged_image_beside_its_partner(browser, tmp_path):
    """featcache inspect on a cache whose images are on disk: two planted copies across splits
    and a relabelled row; every thumbnail and the map load in the browser from the page alone,
    and the tables sort."""
    from test_inspect import blobs, write

    import pipeline as fc

    from conftest import make_image

    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 0.5, (2, 256))
    splits = {}
    for k, (split, n) in enumerate((("train", 80), ("validation", 20))):
        x, y = blobs(n, centres, rng)
        paths = [f"{split}/{'ab'[c]}/{i}.png" for i, c in enumerate(y)]
        for i, p in enumerate(paths):
            make_image(root / p, (200, 40, 40) if y[i] else (40, 40, 200), 40, seed=1000 * k + i)
        splits[split] = (x, y, paths)
    (xt, yt, pt), (xv, yv, pv) = splits["train"], splits["validation"]
    yt[5] = 1 - yt[5]  # a label error
    splits["validation"] = (np.concatenate([xv, xt[:2]]), np.r_[yv, yt[:2]], [*pv, pt[0], pt[1]])  # two leaks
    result = fc.inspect(write(tmp_path / "c.h5", splits, ("a", "b"), data=str(root)), runs_dir=tmp_path / "runs")
    assert result.counts["leakage"] == 2 and pt[5] in {r["path"] for r in result.findings["label_issues"]}

    browser.get(result.html.as_uri())
    cards = browser.find_elements(By.CSS_SELECTOR, 'div.pair[data-finding="leakage"]')
    assert len(cards) == 2 and all(len(c.find_elements(By.TAG_NAME, "img")) == 2 for c in cards)
    assert browser.find_elements(By.CSS_SELECTOR, 'div.pair[data-finding="label_issues"] img')
    loaded = browser.execute_script(
        "return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0);"
    )
    thumbs = sum(1 + bool(r.get("partner")) for rows in result.findings.values() for r in rows[:30])
    assert loaded == [True] * (thumbs + 1)  # every thumbnail, and the map
    tables = browser.find_elements(By.CSS_SELECTOR, "table.sortable")
    leak = next(t for t in tables if t.find_elements(By.TAG_NAME, "th")[0].text == "path" and "validation" in t.text)
    score = next(th for th in leak.find_elements(By.TAG_NAME, "th") if th.text == "score")
    col = [th.text for th in leak.find_elements(By.TAG_NAME, "th")].index("score")
    score.click()
    values = [
        float(tr.find_elements(By.TAG_NAME, "td")[col].text) for tr in leak.find_elements(By.CSS_SELECTOR, "tbody tr")
    ]
    assert values == sorted(values)


# --------------------------------------------------------------------------- the MLflow UI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_ui(tmp_path_factory):
    """A tracked sweep's runs in a fresh SQLite store and ``mlflow ui`` serving it on
    127.0.0.1 (start bounded in time; the server's process group stopped at the end)."""
    pytest.importorskip("mlflow", reason="MLflow is not installed (the `track` extra)")
    from pipeline.runs import tracking

    from conftest import separable, synthetic_meta

    tmp = tmp_path_factory.mktemp("mlflow-ui")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    rows = [
        {
            "index": i,
            "head": "logreg",
            "pooling": p,
            "params": "{}",
            "train_on": "clean",
            "val_accuracy": a,
            "val_log_loss": 0.5,
            "fit_seconds": 0.1,
            "winner": i == 1,
        }
        for i, (p, a) in enumerate([("flatten", 0.7), ("avg", 0.9), ("max", 0.8)])
    ]
    run_dir = tmp / "20260101-000000-sweep"
    run_dir.mkdir()
    old = os.environ.get("TRACK")
    os.environ["TRACK"] = "1"
    try:
        summary = tracking.log_sweep(
            tracking.Tracker(uri=uri),
            run_dir,
            synthetic_meta(separable(2)[0]),
            rows,
            [None] * 3,
            [{"C": 1.0}] * 3,
            {"seed": 0},
        )
    finally:
        os.environ["TRACK"] = old if old is not None else "0"
    assert summary["note"] is None, summary["note"]
    port = _free_port()
    log = (tmp / "ui.log").open("w")
    server = subprocess.Popen(
        tracking.ui_command(port, uri=uri), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + UI_START_SECONDS
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow ui did not answer on 127.0.0.1:{port} within {UI_START_SECONDS} s "
                    f"(exit {server.poll()}):\n{(tmp / 'ui.log').read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", summary, rows
    finally:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(server.pid, sig)  # the server's own group: mlflow ui runs uvicorn as a child
                server.wait(wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def test_mlflow_ui_lists_the_sweep_and_its_child_runs(browser, mlflow_ui):
    from mlflow.tracking import MlflowClient

    address, summary, rows = mlflow_ui
    experiment_id = MlflowClient(summary["uri"]).get_run(summary["run_id"]).info.experiment_id
    browser.get(f"{address}/#/experiments/{experiment_id}/runs")
    wait = WebDriverWait(browser, 90)
    parent_name = "20260101-000000-sweep"
    wait.until(lambda d: parent_name in d.find_element(By.TAG_NAME, "body").text)
    assert "4 matching runs" in browser.find_element(By.TAG_NAME, "body").text  # 1 parent + 3 children
    cell = browser.find_element(By.XPATH, f"//a[.//span[text()='{parent_name}']]/ancestor::*[@role='gridcell'][1]")
    cell.find_element(By.TAG_NAME, "button").click()  # the parent's expander shows its children
    children = [f"#{r['index']:02d} logreg {r['pooling']}" for r in rows]
    wait.until(lambda d: all(c in d.find_element(By.TAG_NAME, "body").text for c in children))
    links = {a.text: a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "a[href*='/runs/']")}
    assert summary["run_id"] in links[parent_name]
    assert set(children) <= set(links)
