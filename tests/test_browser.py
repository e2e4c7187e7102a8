"""index.html in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven
by selenium) opens the generated page from disk with no network, and the page must run without a
JavaScript error, draw one plot trace per method, sort a table on a click and filter it on typing, fit
its tables in 1400 px, and leave a screenshot. Skipped, saying why, only where no browser is found."""

import shutil
from pathlib import Path

import pytest
from test_report import synthetic_rows

from bench.report import write_report
from bench.run.results import rows_to_frame

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVERS = ("chromedriver", "/usr/lib/chromium/chromedriver")


def _find(names) -> str | None:
    for name in names:
        path = shutil.which(name) or (name if Path(name).is_file() else None)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    binary, driver_path = _find(BROWSERS), _find(DRIVERS)
    if not binary or not driver_path:
        pytest.skip("no Chromium browser and chromedriver found (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--hide-scrollbars"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):
    from selenium.webdriver.support.ui import WebDriverWait

    out = tmp_path_factory.mktemp("browser")
    write_report(rows_to_frame(synthetic_rows()), out, title="Browser board")
    browser.get((out / "index.html").as_uri())
    WebDriverWait(browser, 20).until(
        lambda d: d.execute_script("return document.querySelectorAll('.js-plotly-plot .main-svg').length") >= 2)
    return browser, out


def test_no_javascript_errors(page):
    driver, _ = page
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
    assert driver.execute_script("return typeof Plotly") == "object"


def test_one_trace_per_method_and_the_control_marked(page):
    driver, _ = page
    plots = driver.execute_script("""return Array.from(document.querySelectorAll('.js-plotly-plot')).map(
        p => p.data.map(t => [t.meta, t.name, t.marker ? t.marker.symbol : null]))""")
    assert len(plots) == 2  # feynman and mnist
    for traces in plots:
        methods = [meta for meta, _, _ in traces if meta != "frontier"]
        assert sorted(methods) == ["bar", "dense", "dense_ft", "foo"]  # each method exactly once
        control = {meta: (name, symbol) for meta, name, symbol in traces}["dense_ft"]
        assert control == ("dense_ft (control)", "star")


def _column(driver, table, header: str) -> list[str]:
    heads = [th.text for th in table.find_elements("css selector", "thead th")]
    col = heads.index(header)
    return [row.find_elements("css selector", "td")[col].text
            for row in table.find_elements("css selector", "tbody tr") if row.is_displayed()]


def _kib(cell: str) -> float:
    return float(cell.split(" ")[0].replace(",", ""))


def test_clicking_a_header_sorts_the_rows(page):
    driver, _ = page
    table = driver.find_element("xpath", "//h3[starts-with(., 'mnist / kan / bspline')]/following::table[1]")
    before = _column(driver, table, "stored KiB (file; ONNX)")
    header = [th for th in table.find_elements("css selector", "thead th") if th.text == "stored KiB (file; ONNX)"][0]
    header.click()
    ascending = _column(driver, table, "stored KiB (file; ONNX)")
    assert ascending != before and [_kib(c) for c in ascending] == sorted(_kib(c) for c in before)
    assert header.get_attribute("aria-sort") == "ascending"
    header.click()
    assert [_kib(c) for c in _column(driver, table, "stored KiB (file; ONNX)")] == sorted(
        (_kib(c) for c in before), reverse=True)


def test_typing_filters_the_rows(page):
    driver, _ = page
    table = driver.find_element("xpath", "//h3[starts-with(., 'mnist / kan / bspline')]/following::table[1]")
    box = driver.find_element("xpath", "//h3[starts-with(., 'mnist / kan / bspline')]/following::input[1]")
    box.send_keys("foo")
    assert sorted(_column(driver, table, "method")) == ["foo", "foo"]
    box.clear()
    box.send_keys(" ")  # an input event with no words: every row is back
    assert len(_column(driver, table, "method")) == 6


def test_tables_fit_1400_px_and_a_screenshot_is_saved(page):
    driver, out = page
    overflowing = driver.execute_script(
        "return Array.from(document.querySelectorAll('.tablewrap')).filter(w => w.scrollWidth > w.clientWidth + 1)"
        ".length")
    assert overflowing == 0
    assert driver.execute_script("return document.documentElement.scrollWidth") <= 1400
    shot = out / "index.png"
    assert driver.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == PNG_MAGIC and shot.stat().st_size > 20_000
