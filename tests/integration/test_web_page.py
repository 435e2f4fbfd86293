"""The web page in headless Chromium against the real app (tiny run, real MariaDB, Ray Serve, API key on).

Needs the Debian packages `chromium` and `chromium-driver` (`.ci/run` installs them); nothing is
downloaded at run time: the driver is given by path, so Selenium Manager never runs.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from conftest import free_tcp_port

pytestmark = pytest.mark.integration
API_KEY = "web-page-test-key"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL_HINT = "apt-get install -y chromium chromium-driver"
ARTIFACT = Path(__file__).resolve().parents[1] / "artifacts" / "web_page.png"
WAIT_S = 90  # two busy cores: a refresh can take a while


@pytest.fixture(scope="module")
def served(tiny_run):
    """The session's tiny run (tests/conftest.py) served with an API key; yields the
    base URL. The end-to-end module served it before, so some customers have bought more."""
    import ray
    from ray import serve

    from ray_apps.app import APP_NAME, build_app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_tcp_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        os.environ["RAYREC_API_KEY"] = API_KEY  # read by build_app, passed on as its hash
        try:
            serve.run(build_app({"workdir": str(tiny_run.root)}), name=APP_NAME, route_prefix="/", blocking=False)
        finally:
            os.environ.pop("RAYREC_API_KEY")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def chrome_driver():
    """Headless system Chromium through the system chromedriver; fails (no skip) when missing."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: install the browser with `{INSTALL_HINT}` (as root)",
                    pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[dev]'", pytrace=False)
    os.environ.setdefault("SE_OFFLINE", "true")  # belt and braces: Selenium Manager must not download
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1100", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


@pytest.fixture(scope="module")
def browser():
    driver = chrome_driver()
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, cond, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(lambda d: cond(d))
    except TimeoutException:
        err = driver.find_element("id", "error")
        shown = err.text if err.is_displayed() else "no error shown"
        pytest.fail(f"timed out after {WAIT_S}s waiting for {what}; the page's error bar: {shown}", pytrace=False)


def cards(driver, container: str = "recs") -> list[str]:
    return [c.get_attribute("data-article-id")
            for c in driver.find_elements("css selector", f"#{container} .card")]


def version(driver, container: str = "recs") -> int:
    return int(driver.find_element("id", container).get_attribute("data-version"))


def save_screenshot(driver, tmp_path: Path) -> Path:
    shot = tmp_path / "web_page.png"
    assert driver.save_screenshot(str(shot)), "screenshot failed"
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, ARTIFACT)
    return shot


def test_page_and_assets_need_no_key_but_the_api_does(served):
    url = served
    page = httpx.get(f"{url}/", timeout=30)
    assert page.status_code == 200 and "/ui/app.js" in page.text
    assert httpx.get(f"{url}/ui/app.js", timeout=30).status_code == 200
    assert httpx.get(f"{url}/ui/style.css", timeout=30).status_code == 200
    assert httpx.get(f"{url}/ui/nope.js", timeout=30).status_code == 404
    assert httpx.get(f"{url}/v1/customers", timeout=30).status_code == 401


def test_choose_customer_buy_and_the_card_is_gone(served, browser, tmp_path):
    from selenium.webdriver.support.ui import Select

    k = 8
    browser.get(f"{served}/")
    # without the key, the API's 401 is shown plainly
    wait_for(browser, lambda d: d.find_element("id", "error").is_displayed(), "the error bar (no key yet)")
    assert "401" in browser.find_element("id", "error-text").text
    assert "API key" in browser.find_element("id", "error-text").text

    browser.find_element("id", "api-key").send_keys(API_KEY)
    browser.find_element("id", "save-key").click()
    select = wait_for(browser, lambda d: len(Select(d.find_element("id", "customer-select")).options) > 1 and
                      Select(d.find_element("id", "customer-select")), "the customer list")
    assert not browser.find_element("id", "error").is_displayed()
    k_input = browser.find_element("id", "k")
    k_input.clear()
    k_input.send_keys(str(k))

    v0 = version(browser)
    select.select_by_index(1)
    wait_for(browser, lambda d: version(d) > v0 and len(cards(d)) == k, f"{k} recommendation cards")
    shown = cards(browser)
    assert len(set(shown)) == k
    first = browser.find_element("css selector", "#recs .card")
    assert re.search(r"score -?\d+\.\d{3}", first.text) and "ranked" in first.text
    assert "price" in first.text
    wait_for(browser, lambda d: d.find_element("id", "profile-section").is_displayed(), "the customer's profile")
    assert "age group" in browser.find_element("id", "age-group").text
    assert "club" in browser.find_element("id", "club-status").text
    latency = browser.find_element("id", "latency").text
    assert "encode" in latency and "retrieved" in latency and "total in the app" in latency

    bought = shown[1]
    v1 = version(browser)
    browser.find_element("css selector", f'#recs .card[data-article-id="{bought}"] button.buy').click()
    wait_for(browser, lambda d: version(d) > v1 and "round trip" in d.find_element("id", "rtt").text,
             "the refreshed recommendations after the purchase")
    after = cards(browser)
    assert bought not in after, f"{bought} was bought but is still recommended: {after}"
    assert len(after) == k and after != shown
    rtt = browser.find_element("id", "rtt").text
    assert re.search(r"round trip \d+ ms", rtt) and "bought article removed" in rtt, rtt
    # the purchase shows up among the customer's last purchases
    wait_for(browser, lambda d: d.find_elements("css selector", f'#purchases .mini[data-article-id="{bought}"]'),
             "the bought article among the last purchases")
    assert not browser.find_element("id", "error").is_displayed()
    shot = save_screenshot(browser, tmp_path)
    assert shot.stat().st_size > 10_000


def test_search_and_similar_articles(served, browser):
    browser.get(f"{served}/")  # the key is kept for the tab (sessionStorage)
    assert browser.find_element("id", "api-key").get_attribute("value") == API_KEY
    v0 = version(browser, "search-results")
    box = browser.find_element("id", "search-input")
    box.send_keys("dress")
    browser.find_element("id", "search-go").click()
    wait_for(browser, lambda d: version(d, "search-results") > v0, "search results")
    found = cards(browser, "search-results")
    assert found, browser.find_element("id", "search-results").text
    v1 = version(browser, "similar")
    browser.find_element("css selector", "#search-results .card button.similar").click()
    wait_for(browser, lambda d: version(d, "similar") > v1, "similar articles")
    similar = cards(browser, "similar")
    assert len(similar) == 12 and found[0] not in similar
    # an API error is shown with its status and message
    v2 = version(browser, "similar")
    browser.execute_script("state.key = 'wrong-key'")
    browser.find_element("css selector", "#similar .card button.similar").click()
    wait_for(browser, lambda d: d.find_element("id", "error").is_displayed(), "the error bar (wrong key)")
    assert "HTTP 401" in browser.find_element("id", "error-text").text
    assert version(browser, "similar") == v2
