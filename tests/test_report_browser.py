"""HTML reports opened in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, which ``make test`` installs where it can), driven by selenium.

Each test renders a report, checks the DOM (charts drawn as SVG with a size, every BN
named, the table filter and sort work), that the console logged no error, and saves a
screenshot under the test's temporary directory (its path is printed, so a failing
test shows where to look). Skipped, with the reason, where Chromium is not installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_report import full_result
from test_report_html import with_timings

from bnfuse import api, report_files
from bnfuse.errors import ValidationError
from bnfuse.result import FuseResult

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
HAS_SELENIUM = importlib.util.find_spec("selenium") is not None
HAS_KERAS = importlib.util.find_spec("tensorflow") is not None

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER and HAS_SELENIUM),
    reason="browser tests need chromium, chromium-driver (apt-get install chromium "
    "chromium-driver; `make test` does it as root) and selenium (the test extra)",
)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import os

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never download anything

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # the system chromedriver: selenium must never fetch a driver or a browser
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=str(DRIVER)))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def open_report(driver: Any, page: Path, shot: Path, min_png: int = 10_000) -> list[dict[str, Any]]:
    """Load ``page``, screenshot it whole into ``shot``; return the console's entries.
    (A rendered report's screenshot is hundreds of KB; a blank page's a few.)"""
    print(f"\nscreenshot of {page.name}: {shot}")  # shown by pytest when the test fails
    driver.get_log("browser")  # drop what an earlier page logged
    driver.set_window_size(1280, 800)  # scrollHeight is at least the window's height
    driver.get(page.as_uri())
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(int(height) + 40, 12000))
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > min_png
    return list(driver.get_log("browser"))


def errors(log: list[dict[str, Any]]) -> list[str]:
    return [e["message"] for e in log if e.get("level") in ("SEVERE", "ERROR")]


def check_page(driver: Any, result: FuseResult, min_charts: int) -> None:
    """Charts drawn, every BN named in the table, filter and sort working."""
    from selenium.webdriver.common.by import By

    charts = driver.find_elements(By.CSS_SELECTOR, "svg.chart")
    assert len(charts) >= min_charts
    for c in charts:
        assert c.size["width"] > 200 and c.size["height"] > 50, c.size
        assert c.find_elements(By.CSS_SELECTOR, "path, rect, line, polyline, use")
    expected = {f.bn for f in result.folds} | {r.bn for r in result.refusals}
    names = [
        e.text for e in driver.find_elements(By.CSS_SELECTOR, "#bn-table tbody td:nth-child(2)")
    ]
    assert sorted(names) == sorted(expected)
    if len(expected) < 2:
        return
    rows = driver.find_elements(By.CSS_SELECTOR, "#bn-table tbody tr")
    target = sorted(expected)[-1]
    box = driver.find_element(By.CSS_SELECTOR, ".filters .filter-text")
    box.send_keys(target)
    visible = [r for r in rows if r.is_displayed()]
    assert visible and all(target.lower() in r.text.lower() for r in visible)
    assert len(visible) < len(rows)
    count = driver.find_element(By.CSS_SELECTOR, ".filters .count").text
    assert count == f"{len(visible)} of {len(rows)} shown"
    box.clear()
    box.send_keys(" ")  # clear() fires no input event; a blank query shows every row
    assert all(r.is_displayed() for r in rows)

    def column(n: int) -> list[str]:
        cells = driver.find_elements(By.CSS_SELECTOR, f"#bn-table tbody td:nth-child({n})")
        return [e.text for e in cells]

    def click(n: int) -> Any:
        th = driver.find_element(By.CSS_SELECTOR, f"#bn-table thead th:nth-child({n})")
        th.click()
        return th

    click(2)  # by BN name, ascending, then descending
    ascending = column(2)
    assert click(2).get_attribute("aria-sort") == "descending"
    assert column(2) == ascending[::-1] and ascending != column(2)
    click(1)
    click(1)  # "#" sorts as numbers: graph order reversed
    assert column(1) == [str(i) for i in range(len(rows), 0, -1)]


def test_onnx_sample_report_in_chromium(browser: Any, tmp_path: Path) -> None:
    result = api.fuse(
        SAMPLES / "digits_cnn_bn.onnx",
        dry_run=True,
        bench=True,
        batches=(1, 4),
        bench_seconds=0.4,
    )
    page = tmp_path / "onnx.html"
    report_files.write_report(result, page)
    log = open_report(browser, page, tmp_path / "onnx.png")
    assert errors(log) == []
    check_page(browser, result, min_charts=3)  # validation, distributions, speedup
    assert len(result.folds) == 4


def test_onnx_report_with_refusals_and_no_bench(browser: Any, tmp_path: Path) -> None:
    # without forward folds, the BNs after the input and after a Relu are refused
    result = api.fuse(SAMPLES / "digits_mlp.onnx", dry_run=True, forward=False)
    assert len(result.refusals) == 2 and len(result.folds) == 2
    page = tmp_path / "mlp.html"
    report_files.write_report(result, page)
    assert errors(open_report(browser, page, tmp_path / "mlp.png")) == []
    check_page(browser, result, min_charts=1)
    from selenium.webdriver.common.by import By

    latency = browser.find_element(By.ID, "latency").text
    assert "latency was not measured" in latency
    select = browser.find_element(By.CSS_SELECTOR, ".filters .filter-status")
    select.send_keys("refused")
    shown = [
        r for r in browser.find_elements(By.CSS_SELECTOR, "#bn-table tbody tr") if r.is_displayed()
    ]
    assert len(shown) == len(result.refusals)


def test_failed_validation_report_in_chromium(browser: Any, tmp_path: Path) -> None:
    skipped = "benchmark skipped: validation failed (--force writes and times it anyway)"
    result = full_result(bench=None, written=False, warnings=(skipped,))
    page = tmp_path / "failed.html"
    report_files.write_report(result, page)
    assert errors(open_report(browser, page, tmp_path / "failed.png")) == []
    check_page(browser, result, min_charts=1)
    from selenium.webdriver.common.by import By

    assert "Validation FAILED" in browser.find_element(By.ID, "validation").text
    assert skipped in browser.find_element(By.ID, "latency").text


def test_summary_pages_in_chromium(browser: Any, tmp_path: Path) -> None:
    from bnfuse.report_html import write_html_summary

    a = with_timings(full_result())
    b = dataclasses.replace(full_result(bench=None), source="b/other.onnx")
    index = write_html_summary([a, b], tmp_path / "site")
    assert errors(open_report(browser, index, tmp_path / "index.png")) == []
    from selenium.webdriver.common.by import By

    links = browser.find_elements(By.CSS_SELECTOR, "#models-table a")
    assert [e.text for e in links] == ["models/resnet.onnx", "b/other.onnx"]
    links[0].click()
    assert browser.current_url.endswith("/resnet.html")
    assert errors(list(browser.get_log("browser"))) == []
    check_page(browser, a, min_charts=3)


@pytest.mark.keras
@pytest.mark.skipif(not HAS_KERAS, reason="needs the keras extra (tensorflow)")
def test_keras_sample_report_in_chromium(browser: Any, tmp_path: Path) -> None:
    try:
        result = api.fuse(
            SAMPLES / "digits_cnn.keras",
            dry_run=True,
            bench=True,
            batches=(1,),
            bench_seconds=0.4,
        )
    except ValidationError as exc:  # pragma: no cover - would be a bug, report it fully
        raise AssertionError(exc.message) from None
    page = tmp_path / "keras.html"
    report_files.write_report(result, page)
    assert errors(open_report(browser, page, tmp_path / "keras.png")) == []
    check_page(browser, result, min_charts=3)
    from selenium.webdriver.common.by import By

    summary = browser.find_element(By.ID, "summary").text
    assert "KERAS" in summary and "tensorflow" in summary and "trainable" in summary
    assert "keras tf.function" in browser.find_element(By.ID, "latency").text


def test_the_console_check_sees_script_errors(browser: Any, tmp_path: Path) -> None:
    """The console capture the tests above rely on does report a failing script."""
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><body><p>x</p><script>null.boom();</script></body></html>",
        encoding="utf-8",
    )
    found = errors(open_report(browser, page, tmp_path / "broken.png", 0))
    assert found and "boom" in " ".join(found)


def test_a_densenet_sized_table_stays_usable(browser: Any, tmp_path: Path) -> None:
    """121 BNs (DenseNet121): the table scrolls inside its box under a sticky header,
    and the filter finds one block's BNs by name."""
    from selenium.webdriver.common.by import By

    from bnfuse.result import Fold, Refusal

    names = [f"conv{s}_block{b}_{k}_bn" for s in (2, 3, 4, 5) for b in range(1, 16) for k in (1, 2)]
    names = ["conv1/bn", *names][:121]
    folds = tuple(Fold(n, n.replace("_bn", "_conv"), "conv-bn", "backward", 64) for n in names[:-1])
    refusal = (Refusal(names[-1], "the Conv output has 2 consumers", rule="conv-bn"),)
    result = full_result(folds=folds, refusals=refusal, validation=None, bench=None)
    page = tmp_path / "densenet.html"
    report_files.write_report(result, page)
    assert errors(open_report(browser, page, tmp_path / "densenet.png")) == []
    check_page(browser, result, min_charts=0)
    browser.set_window_size(1280, 800)
    box = browser.find_element(By.CSS_SELECTOR, "#normalizations .scroll")
    table = browser.find_element(By.ID, "bn-table")
    inner = browser.execute_script("return window.innerHeight")
    assert box.size["height"] <= 0.71 * inner < table.size["height"]  # it scrolls in its box
    header_gap = browser.execute_script(
        "const box = arguments[0]; box.scrollTop = 1500;"
        "return box.querySelector('thead th').getBoundingClientRect().top"
        " - box.getBoundingClientRect().top;",
        box,
    )
    assert abs(header_gap) <= 2  # the header stays on top while the rows scroll
    rows = browser.find_elements(By.CSS_SELECTOR, "#bn-table tbody tr")
    assert len(rows) == 121
    browser.find_element(By.CSS_SELECTOR, ".filters .filter-text").send_keys("conv3_block12_")
    shown = [
        r.find_element(By.CSS_SELECTOR, "td:nth-child(2)").text for r in rows if r.is_displayed()
    ]
    assert sorted(shown) == ["conv3_block12_1_bn", "conv3_block12_2_bn"]
