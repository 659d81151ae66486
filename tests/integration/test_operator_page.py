"""The operator page in Debian's headless Chromium (driven through chromedriver by selenium): it shows the device,
streams a chat, refuses without the key when a key is set, stays offline (nothing fetched from elsewhere), small, and
free of request text and secrets. Screenshots go to the test's directory (one is kept as docs/operator-page.png)."""

from __future__ import annotations

import base64
import os
import re
import shutil
import time
import urllib.parse
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from appliance import __version__
from tests.support.harness import FakeBoard, http_get, http_post, merge

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
KEY = "operator-key-0123456789abcdef"
SECRET_PROMPT = "the password to the pump house is swordfish"
SCREENSHOTS = os.environ.get("APPLIANCE_SCREENSHOTS")  # a directory to copy the screenshots to (docs/ keeps one)


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("Chromium is required (apt install chromium chromium-driver); .ci/run installs it")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=412,1400",
                 # the device is offline: any host but loopback fails to resolve, so a CDN would show up as an error
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(412, max(800, height + 40))
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.3)
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    if SCREENSHOTS:
        shutil.copy(path, Path(SCREENSHOTS) / f"{name}.png")
    return path


def with_key(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return parts._replace(netloc=f"operator:{KEY}@{parts.netloc}").geturl()


def keyed_appliance(factory, tmp_path, default="tiny", extra=None, env=None):
    key_file = tmp_path / "api-key"
    key_file.write_text(KEY + "\n")
    app = factory(default, merge({"http": {"api_key_file": str(key_file)}}, extra or {}), mqtt=False, env=env,
                  start=False)
    app.start(wait=False)
    app.readyz_until("ready", headers={"Authorization": f"Bearer {KEY}"})
    return app


def release_dir(tmp_path: Path) -> Path:
    root = tmp_path / "opt-appliance"
    for name in ("0.1.0-r1", "0.1.0-r2"):
        (root / "releases" / name).mkdir(parents=True)
    (root / "current").symlink_to("releases/0.1.0-r2")
    (root / "previous").symlink_to("releases/0.1.0-r1")
    return root


def test_page_refuses_without_the_key(appliance_factory, browser, tmp_path):
    app = keyed_appliance(appliance_factory, tmp_path)
    browser.get(app.http_url + "/")
    # the browser asks for credentials (HTTP Basic); headless, nobody answers, and nothing of the device shows
    status = browser.execute_script("return performance.getEntriesByType('navigation')[0].responseStatus")
    assert status == 401
    assert "tiny" not in browser.page_source and "state-name" not in browser.page_source
    screenshot(browser, tmp_path, "operator-page-refused")
    for path in ("/", "/ui/panel", "/ui/static/page.js", "/ui/static/page.css"):
        status, text = http_get(app.http_url + path)
        assert status == 401 and b"tiny" not in text, path
    status, _ = http_get(app.http_url + "/", headers={"Authorization": "Basic " + base64.b64encode(
        b"operator:wrong").decode()})
    assert status == 401
    status, page = http_get(app.http_url + "/", headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200 and b"tiny" in page
    # with browser credentials a POST must be JSON, so another site's form cannot make the device generate
    basic = {"Authorization": "Basic " + base64.b64encode(f"x:{KEY}".encode()).decode()}
    status, body = http_post(app.http_url + "/v1/completions", b'{"prompt": "hi", "max_tokens": 2}',
                             headers={**basic, "Content-Type": "text/plain"})
    assert status == 401, body
    status, body = http_post(app.http_url + "/v1/completions", {"prompt": "hi", "max_tokens": 2}, headers=basic)
    assert status == 200, body


def test_page_shows_the_device_and_streams_a_chat(appliance_factory, browser, tmp_path):
    board = FakeBoard(tmp_path / "board")
    board.set_temperature(61.5)
    board.set_throttled(0x50005)
    overrides = merge(board.overrides(), {"device": {"release_dir": str(release_dir(tmp_path))},
                                          "worker": {"context_size": 4096, "request_timeout": 300}})
    app = keyed_appliance(appliance_factory, tmp_path, "slow", overrides, env=board.env())
    auth = {"Authorization": f"Bearer {KEY}"}
    # errors the page must count, by code, without the text that caused them
    http_post(app.http_url + "/v1/completions", {"model": "nope", "prompt": SECRET_PROMPT}, headers=auth)
    http_post(app.http_url + "/v1/completions", {"prompt": SECRET_PROMPT, "max_tokens": "many"}, headers=auth)
    time.sleep(2.5)  # a few supervisor readings for the history

    browser.get(with_key(app.http_url + "/"))
    text = browser.find_element(By.TAG_NAME, "body").text
    assert browser.find_element(By.ID, "state-name").text == "ready"
    assert "61.5 °C" in browser.find_element(By.ID, "temperature").text
    assert "under_voltage" in browser.find_element(By.ID, "throttle").text
    assert "MiB available" in browser.find_element(By.ID, "memory").text
    assert "0 waiting" in browser.find_element(By.ID, "queue").text
    assert browser.find_element(By.ID, "release").text == "0.1.0-r2 · previous 0.1.0-r1"
    assert __version__ in text
    errors = browser.find_element(By.ID, "errors").text
    assert "unknown_model" in errors and "bad_request" in errors and "(max_tokens)" in errors
    metrics = http_get(app.http_url + "/metrics", headers=auth)[1].decode()
    assert 'appliance_errors_total{code="bad_request"} 1.0' in metrics, "the browser's own requests are no errors"
    models = browser.find_element(By.ID, "models").text
    for model in ("tiny", "slow", "tiny-chat"):
        assert model in models
    digests = [e.get_attribute("title") for e in browser.find_elements(By.CSS_SELECTOR, "code.digest")]
    assert all(re.fullmatch(r"[0-9a-f]{64}", d) for d in digests) and len(digests) == 5
    polyline = browser.find_element(By.CSS_SELECTOR, "#temperature-chart polyline")
    assert len(polyline.get_attribute("points").split()) >= 1
    assert browser.find_elements(By.CSS_SELECTOR, "#temperature-chart rect.throttled"), "throttling is shaded"
    assert SECRET_PROMPT not in browser.page_source

    # the chat streams: the answer grows in several steps before the request is done
    browser.find_element(By.ID, "chat-input").send_keys("Tell me about the river.")
    browser.find_element(By.ID, "chat-max-tokens").clear()
    browser.find_element(By.ID, "chat-max-tokens").send_keys("400")
    browser.find_element(By.ID, "chat-send").click()
    lengths, deadline = [], time.monotonic() + 240
    while browser.find_element(By.ID, "chat-status").text != "done":
        assert time.monotonic() < deadline, "the chat never finished"
        answer = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        if answer and answer[-1].text and (not lengths or lengths[-1] != len(answer[-1].text)):
            lengths.append(len(answer[-1].text))
        time.sleep(0.05)
    final = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    assert len(lengths) >= 3 and lengths[-1] <= len(final), f"no streaming seen: {lengths}"
    screenshot(browser, tmp_path, "operator-page")

    # nothing came from anywhere but the device, and the page keeps no copy of the conversation
    origins = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
    assert set(origins) <= {app.http_url}, origins
    browser.get(with_key(app.http_url + "/"))
    assert "the river" not in browser.page_source and SECRET_PROMPT not in browser.page_source
    assert "the river" not in app.log_text() and SECRET_PROMPT not in app.log_text()
    assert KEY not in browser.page_source


def test_page_is_small_self_contained_and_locked_down(appliance_factory):
    app = appliance_factory(mqtt=False)
    total = 0
    status, page = http_get(app.http_url + "/")
    assert status == 200
    assets = re.findall(rb'(?:src|href)="([^"]+)"', page)
    assert sorted(assets) == [b"/ui/static/page.css", b"/ui/static/page.js"]
    for body in [page] + [http_get(app.http_url + a.decode())[1] for a in assets]:
        total += len(body)
        assert not re.search(rb"https?://", body), "no CDN: the device is offline"
    assert total < 100 * 1024, total
    import urllib.request
    with urllib.request.urlopen(app.http_url + "/") as resp:
        csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert b"<script>" not in page, "no inline script: the policy forbids it"
