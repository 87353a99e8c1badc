"""trainer/serve/static/chat.html in a real headless Chromium: type a message, watch the reply stream in.

Debian's chromium and chromium-driver (tests/tools.py `ensure_chromium` installs them), driven by selenium,
against the served app of tests/serve_app.py. The page must load nothing from outside the server; a
screenshot of the finished conversation is kept under tests/artifacts/ (ignored by git) for a human to look at.
Run: .venv/bin/pytest tests/serve/test_page.py
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).parents[1] / "artifacts"


def test_the_page_has_no_external_assets():
    html = (Path(__file__).parents[2] / "trainer" / "serve" / "static" / "chat.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html and "url(" not in html


@pytest.fixture
def browser(tmp_path):
    from tests.tools import chromium_webdriver

    with chromium_webdriver(tmp_path / "profile", performance_log=True) as driver:  # a fresh profile every time
        yield driver


def test_type_a_message_and_see_the_reply_stream_in(served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 90)
    browser.get(served.url + "/")
    wait.until(lambda d: d.find_element(By.ID, "model").text == served.model)  # /v1/models answered
    # the controls: temperature and top-k travel with the request
    browser.execute_script("document.getElementById('temperature').value = '0';"
                           "document.getElementById('temperature').dispatchEvent(new Event('input'));"
                           "document.getElementById('max-tokens').value = '48';")
    assert browser.find_element(By.ID, "temperature-value").text == "0"
    # record every text length the reply bubble goes through while it streams
    browser.execute_script("""
        window.__lengths = [];
        new MutationObserver(() => {
          const b = document.querySelector('.msg.assistant .bubble');
          if (b) window.__lengths.push(b.textContent.length);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    """)
    box = browser.find_element(By.ID, "input")
    box.send_keys("Tell me about the quick brown fox")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.user .bubble"))
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user .bubble").text == "Tell me about the quick brown fox"
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, ".msg.streaming")
               and d.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    reply = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .bubble").text
    lengths = [n for n in browser.execute_script("return window.__lengths;") if n > 0]
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "serve_page.png"))
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error"), reply
    assert reply and "<|" not in reply
    assert len(set(lengths)) > 1, f"the reply appeared in one piece (lengths {lengths}), not streamed"
    # the request the page sent carried the controls' values
    sent = [e for e in browser.get_log("performance") if "v1/chat/completions" in e["message"]
            and "postData" in e["message"]]
    assert sent and '\\"temperature\\":0' in sent[0]["message"] and '\\"top_k\\":50' in sent[0]["message"]
    # a second turn keeps the history; New chat clears it
    box.send_keys("And the lazy dog?")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2
               and not d.find_elements(By.CSS_SELECTOR, ".msg.streaming"))
    browser.save_screenshot(str(ARTIFACTS / "serve_page_two_turns.png"))
    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    assert browser.find_element(By.ID, "empty").is_displayed()
