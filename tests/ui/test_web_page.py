"""The web page at / in headless Chromium (Debian's, driven by Playwright), against a live server on
127.0.0.1 serving the default model: chat, token alternatives and forks, the engine panel during a
generation, the probes view, and the API key on and off. Screenshots go to test-artifacts/ui/."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from live_server import LiveServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"
# Chromium's own background connections are refused on this closed network: turn them off.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
KEY = "sk-page"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert os.path.exists(CHROMIUM), "Debian's chromium is missing: `make test` installs it"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def jobs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ui-jobs")


@pytest.fixture(scope="module")
def server(jobs_dir):
    with LiveServer(served_model_name="smollm", max_model_len=1024, max_tokens_limit=256, jobs_dir=str(jobs_dir)) as live:
        yield live


def _page(browser, url: str, width: int = 1280):
    page = browser.new_page(viewport={"width": width, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.errors = errors
    return page


def _generations(page) -> int:
    return int(page.evaluate("document.body.dataset.generations || 0"))


def _wait_generated(page, before: int, timeout: int = 60_000) -> None:
    page.wait_for_function(f"Number(document.body.dataset.generations || 0) > {before}", timeout=timeout)


def _prompt_tokens_computed(server) -> int:
    import httpx

    return httpx.get(server.url + "/v1/engine").json()["stats"]["prompt_tokens_total"]


def _send(page, text: str, max_tokens: int = 24) -> None:
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#temperature", "0")
    before = _generations(page)
    page.fill("#input", text)
    page.keyboard.press("Enter")
    _wait_generated(page, before)


def test_chat_streams_an_answer(browser, server):
    page = _page(browser, server.url)
    assert page.text_content("#model-name") == "smollm" or page.wait_for_selector("text=smollm")
    page.fill("#system", "Be brief.")
    _send(page, "What is the capital of France?")
    answer = page.locator(".message.assistant .body").last
    assert len(answer.inner_text().strip()) > 0
    page.screenshot(path=ARTIFACTS / "chat.png")
    assert page.locator(".message.user").count() == 1 and not page.errors


def test_stop_regenerate_and_edit_keep_branches(browser, server):
    page = _page(browser, server.url)
    page.click("#new-chat")
    page.fill("#max_tokens", "200")
    page.fill("#temperature", "0")
    before = _generations(page)
    page.fill("#input", "Write a very long story about a lighthouse keeper.")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('.message.assistant .body').textContent.length > 20",
                           timeout=60_000)
    page.click("#stop")
    _wait_generated(page, before)
    stopped = page.locator(".message.assistant .body").last.inner_text()
    assert 0 < len(stopped) and page.is_enabled("#send")
    page.fill("#max_tokens", "8")
    before = _generations(page)
    page.locator(".message.assistant button", has_text="Regenerate").click()
    page.wait_for_selector(".message.assistant >> text=2/2")
    _wait_generated(page, before)
    # Edit the question inline: a new branch, answered again; the old one stays a click away.
    page.locator(".message.user button.edit").click()
    page.fill(".message.user textarea.edit-text", "Say hello.")
    before = _generations(page)
    page.keyboard.press("Control+Enter")
    _wait_generated(page, before)
    assert page.locator(".message.user .body").inner_text().strip() == "Say hello."
    page.locator(".message.user button[aria-label='previous branch']").click()
    assert "lighthouse" in page.locator(".message.user .body").inner_text()
    assert page.locator(".message.assistant >> text=2/2").count() == 1  # the regenerated answers are still there
    # Edit an answer: kept as written, beside the model's; Escape cancels an edit.
    page.locator(".message.assistant button.edit").click()
    page.fill(".message.assistant textarea.edit-text", "An answer **I wrote**.")
    page.locator(".message.assistant button.save").click()
    assert page.locator(".message.assistant .body strong").inner_text() == "I wrote"
    assert page.locator(".message.assistant >> text=3/3").count() == 1
    page.locator(".message.assistant button.edit").click()
    page.keyboard.press("Escape")
    assert page.locator("textarea.edit-text").count() == 0
    page.screenshot(path=ARTIFACTS / "branches.png")
    assert not page.errors


def test_keyboard_only_chat_and_alternatives(browser, server):
    page = _page(browser, server.url)
    page.click("#new-chat")
    page.fill("#max_tokens", "8")
    page.fill("#temperature", "0")
    page.focus("#input")
    before = _generations(page)
    page.keyboard.type("Name a fruit.")
    page.keyboard.press("Enter")
    _wait_generated(page, before)
    page.locator(".message.assistant .show-tokens").focus()
    page.keyboard.press("Enter")  # a button: Enter presses it
    page.locator(".message.assistant .tok").first.focus()
    page.keyboard.press("Enter")
    assert page.is_visible("#token-popover")
    assert page.evaluate("document.activeElement.classList.contains('alt')")  # focus moved into the popover
    page.keyboard.press("Escape")
    assert not page.is_visible("#token-popover")
    tabs = page.locator("[role=tab]")
    tabs.nth(1).focus()
    page.keyboard.press("Enter")
    assert tabs.nth(1).get_attribute("aria-selected") == "true" and page.is_visible("#panel-engine")
    assert not page.errors


def test_dark_mode(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 900}, color_scheme="dark")
    page.goto(server.url)
    page.click("#new-chat")
    _send(page, "Write a Python function that adds two numbers.", max_tokens=48)
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(21, 23, 27)"  # --bg of the dark palette
    page.screenshot(path=ARTIFACTS / "dark.png")
    page.close()


def test_import_refuses_a_malformed_file(browser, server, tmp_path):
    page = _page(browser, server.url)
    page.click("#new-chat")
    titles = page.locator("#conversation-list li").all_inner_texts()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "x", "title": "loop", "roots": [], "leaf": "a",
                                "nodes": {"a": {"id": "a", "parent": "a", "role": "user", "content": "", "children": []}}}]))
    page.set_input_files("#import", str(bad))
    page.wait_for_selector("#notice >> text=Not imported")
    assert page.locator("#conversation-list li").all_inner_texts() == titles
    exported = tmp_path / "good.json"
    with page.expect_download() as download:
        page.click("#export")
    download.value.save_as(exported)
    page.evaluate("localStorage.clear()")
    page.reload()
    page.set_input_files("#import", str(exported))
    page.wait_for_selector("#notice >> text=Imported")
    assert page.locator("#conversation-list li").all_inner_texts() == titles
    assert not page.errors


def test_token_alternatives_fork_a_branch(browser, server):
    page = _page(browser, server.url)
    page.click("#new-chat")
    _send(page, "Name a colour.", max_tokens=12)
    page.locator(".message.assistant .show-tokens").last.click()
    tokens = page.locator(".message.assistant .tok")
    assert tokens.count() > 1
    at = tokens.count() - 2
    kept = [tokens.nth(i).inner_text() for i in range(at)]
    tokens.nth(at).click()
    alternatives = page.locator("#token-popover button.alt")
    assert page.is_visible("#token-popover") and alternatives.count() == 5
    chosen = json.loads(alternatives.nth(1).locator("span").first.inner_text())
    page.screenshot(path=ARTIFACTS / "alternatives.png")
    before, computed = _generations(page), _prompt_tokens_computed(server)
    alternatives.nth(1).click()
    page.wait_for_selector("text=2/2")
    _wait_generated(page, before)
    forked = page.locator(".message.assistant .tok")
    assert [forked.nth(i).inner_text() for i in range(at + 1)] == kept + [chosen]  # the prefix, then the choice
    # The conversation and the kept tokens come from the prefix cache: at most a block is computed again.
    assert _prompt_tokens_computed(server) - computed <= server.info.block_size
    page.screenshot(path=ARTIFACTS / "fork.png")
    assert not page.errors


def test_engine_panel_follows_a_generation(browser, server):
    page = _page(browser, server.url)
    page.fill("#max_tokens", "96")  # the sampling panel, before the engine panel takes its place
    page.fill("#temperature", "0")
    page.click("[data-panel=engine]")
    page.wait_for_selector("#block-map i")
    before = int(page.text_content('[data-stat="tokens generated"]'))
    page.fill("#input", "Write a long story about a dragon.")
    generated = _generations(page)
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('[data-stat=running]').textContent === '1'", timeout=30_000)
    assert page.locator("#block-map i.u").count() > 0  # the request's blocks, in use
    page.screenshot(path=ARTIFACTS / "engine.png")
    _wait_generated(page, generated, timeout=90_000)
    page.wait_for_function("document.querySelector('[data-stat=running]').textContent === '0'", timeout=10_000)
    assert int(page.text_content('[data-stat="tokens generated"]')) > before
    assert not page.errors


def test_engine_panel_shows_a_batch_job(browser, server, jobs_dir, tmp_path):
    page = _page(browser, server.url)
    page.click("[data-panel=engine]")
    page.wait_for_selector("#batch-jobs li.muted")  # none yet
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Count to {i}:"}) + "\n" for i in range(24)))
    job = subprocess.Popen([sys.executable, "-m", "pagedllm.entrypoints.cli", "infer", "-i", str(data), "-o",
                            str(tmp_path / "out.jsonl"), "--max-tokens", "12", "--rows-in-flight", "2", "--no-progress"],
                           env={**os.environ, "PAGEDLLM_JOBS_DIR": str(jobs_dir)}, stderr=subprocess.PIPE, text=True)
    try:
        page.wait_for_selector("#batch-jobs li[data-job-state=running]", timeout=60_000)
        page.wait_for_function("Number(document.querySelector('#batch-jobs li').dataset.jobDone) > 0", timeout=60_000)
        page.screenshot(path=ARTIFACTS / "batch.png")
        assert job.wait(timeout=120) == 0, job.stderr.read()
    finally:
        job.kill()
    page.wait_for_selector("#batch-jobs li[data-job-state=finished][data-job-done='24']", timeout=10_000)
    assert page.locator("#batch-jobs progress").get_attribute("value") == "24"
    assert "rows.jsonl" in page.text_content("#batch-jobs") and not page.errors


def test_inside_shows_the_probes(browser, server):
    page = _page(browser, server.url)
    page.click("#new-chat")
    _send(page, "Hello!", max_tokens=8)
    page.locator(".message.assistant button", has_text="Inside").last.click()
    page.wait_for_selector("table.lens tbody tr", timeout=60_000)
    assert page.locator("table.lens tbody tr").count() == 30
    assert page.locator("svg.cosine polyline").count() == 1 and page.locator(".heatmap span").count() > 0
    page.screenshot(path=ARTIFACTS / "inside.png")
    assert not page.errors


def test_phone_width_and_conversations_kept(browser, server):
    page = _page(browser, server.url, width=390)
    page.click("#new-chat")
    _send(page, "Hi", max_tokens=6)
    page.screenshot(path=ARTIFACTS / "phone.png", full_page=True)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the phone
    titles = page.locator("#conversation-list li").all_inner_texts()
    page.reload()
    assert page.locator("#conversation-list li").all_inner_texts() == titles  # kept in the browser
    assert not page.errors


def test_api_key_is_asked_for_and_kept_out_of_urls(browser):
    with LiveServer(served_model_name="smollm", api_key=KEY, max_model_len=512) as keyed:
        page = _page(browser, keyed.url)
        page.wait_for_selector("#key-dialog[open]")
        page.screenshot(path=ARTIFACTS / "key.png")
        page.fill("#key-input", KEY)
        page.click("#key-form button")
        page.wait_for_selector("text=smollm")
        urls: list[str] = []
        page.on("request", lambda r: urls.append(r.url))
        _send(page, "Hi", max_tokens=4)
        assert urls and not any(KEY in u for u in urls)
        assert page.evaluate("localStorage.getItem('pagedllm.key')") is None
        assert KEY not in page.evaluate("JSON.stringify(localStorage)")


def test_no_ui_leaves_the_api_only():
    import httpx

    with LiveServer(served_model_name="smollm", ui=False, max_model_len=512) as bare:
        assert httpx.get(bare.url + "/").status_code == 404
        assert httpx.get(bare.url + "/v1/models").status_code == 200
