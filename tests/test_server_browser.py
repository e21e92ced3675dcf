"""The chat page in headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

Real server processes: the MLX back end (smoke model + adapter) for the
chat flow, and ``server.py --ollama`` against tests/fake_ollama.py for
model output that contains HTML (the only faked part is Ollama itself).
Screenshots go to tests/artifacts/server_page.png and server_page_phone.png.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ARTIFACTS, ServerProcess, server_adapter
from fake_ollama import FakeOllama

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
XSS = "<img src=x onerror=window.__xss=1>"
MODEL_HTML = "<img src=x onerror=window.__xss=2><script>window.__xss=3</script><b>粗体</b> 换水要慢。"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium "
                                                               "(apt-get install chromium)")


@pytest.fixture(scope="module")
def browser():
    pw = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    p = pw.sync_playwright().start()
    b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
    yield b
    b.close()
    p.stop()


@pytest.fixture(scope="module")
def mlx_server(smoke_model_dir, tiny_data_dir, tmp_path_factory):
    adapter = server_adapter(smoke_model_dir, tiny_data_dir)
    folder = tmp_path_factory.mktemp("browser")
    srv = ServerProcess(["--model", smoke_model_dir, "--adapter-path", adapter, "--max-tokens", "16", "--seed", "3",
                         "--data-dir", folder / "data"], folder / "server.log")
    yield srv
    srv.stop()


def open_page(browser, url: str, **ctx):
    # bypass_csp: Playwright's waits need eval, and without the page's CSP the XSS checks
    # test the rendering itself (textContent), not the CSP safety net.
    context = browser.new_context(bypass_csp=True, **ctx)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")
    return context, page, errors


def ask(page, text: str) -> None:
    n = page.locator(".msg.assistant[data-done]").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(f"document.querySelectorAll('.msg.assistant[data-done]').length > {n}", timeout=60_000)


def bubbles(page) -> list[tuple[str, str]]:
    return [tuple(x) for x in page.eval_on_selector_all(
        ".msg", "els => els.map(e => [e.classList.contains('user') ? 'user' : 'assistant', "
                "e.querySelector('.bubble').textContent])")]


def test_chat_page_stream_reload_clear_and_user_xss(browser, mlx_server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context, page, errors = open_page(browser, mlx_server.url, viewport={"width": 1100, "height": 720})
    page.wait_for_function("document.getElementById('model-info').textContent.includes('mlx')")
    info = page.text_content("#model-info")
    assert "smoke-tiny" in info and "adapter server-adapter" in info and "alpaca" in info

    # Shift+Enter is a new line, not a send
    page.fill("#input", "第一行")
    page.press("#input", "Shift+Enter")
    page.keyboard.type("第二行")
    assert page.input_value("#input") == "第一行\n第二行" and page.locator(".msg").count() == 0

    # the answer streams in: count the updates of the answer bubble
    page.evaluate("""() => { window.__updates = 0; new MutationObserver(() => window.__updates++)
        .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }""")
    ask(page, "鱼身上有白点还蹭缸怎么办？")
    msgs = bubbles(page)
    assert msgs[0] == ("user", "鱼身上有白点还蹭缸怎么办？") and msgs[1][0] == "assistant" and len(msgs) == 2
    answer = msgs[1][1]
    assert answer.strip() and page.get_attribute(".msg.assistant", "data-done") in ("stop", "length")
    assert page.evaluate("window.__updates") >= 4  # several deltas, not one final write
    ask(page, "要换水吗？")
    page.screenshot(path=str(ARTIFACTS / "server_page.png"))
    before = bubbles(page)
    assert len(before) == 4

    # history survives a reload (server-side session, by cookie)
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert bubbles(page) == before

    # a user's HTML is shown as text and runs nothing
    ask(page, XSS)
    assert bubbles(page)[-2] == ("user", XSS)
    assert page.locator("#messages img, #messages script").count() == 0
    assert page.evaluate("window.__xss") is None

    # clear empties the page and the server's history; a reload stays empty
    page.click("#clear")
    page.wait_for_function("document.querySelectorAll('.msg').length === 0")
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert bubbles(page) == []
    assert not errors, errors
    context.close()

    # a second browser (another user) never sees the first one's history
    context2, page2, _ = open_page(browser, mlx_server.url)
    assert bubbles(page2) == []
    context2.close()


def test_phone_width_screenshot(browser, mlx_server):
    context, page, errors = open_page(browser, mlx_server.url, viewport={"width": 390, "height": 780},
                                      device_scale_factor=2, is_mobile=True, has_touch=True)
    ask(page, "孔雀鱼多久换一次水？")
    # nothing wider than the screen: no horizontal scrolling at phone width
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    box = page.locator("#send").bounding_box()
    assert box["x"] + box["width"] <= 390 and box["height"] >= 40  # the send button is on screen and tappable
    page.screenshot(path=str(ARTIFACTS / "server_page_phone.png"))
    assert not errors, errors
    context.close()


def test_model_output_html_is_text(browser, tmp_path):
    """The model 'answers' with HTML (fake Ollama behind the real server): shown as text, nothing runs."""
    with FakeOllama(replies={"xss-model": MODEL_HTML}) as fake:
        srv = ServerProcess(["--ollama", "xss-model", "--ollama-url", fake.url, "--no-persist"], tmp_path / "server.log")
        try:
            context, page, errors = open_page(browser, srv.url)
            ask(page, "换水要注意什么？")
            assert bubbles(page) == [("user", "换水要注意什么？"), ("assistant", MODEL_HTML)]
            assert page.locator("#messages img, #messages script, #messages b").count() == 0
            assert page.evaluate("window.__xss") is None
            assert not errors, errors
            context.close()
        finally:
            srv.stop()
    assert fake.requests and fake.requests[-1]["stream"] is True
