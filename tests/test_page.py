"""The page at the server's "/" (src/gpt2/page/), in a real headless browser: Debian's Chromium
(.ci/run installs it), driven by Playwright, against serve.py processes on a factory model.

Every test gets a fresh browser context, and fails where the page's JavaScript logged an error or
where the page asked anything of another address than the server's (it must work offline). Each
test's last screen is saved in $GPT2_TEST_ARTIFACTS, else in a temporary folder (pytest -s prints it).
"""
import concurrent.futures
import os
import re
import time

import pytest
from playwright.sync_api import expect, sync_playwright

import gpt2
from gpt2.testing import make_model_folder
from test_server import KEY, Served, streamed_with_key, token_name

CHROMIUM = "/usr/bin/chromium"
PROMPT = "The river"
TOP_K = 40  # the page's default
EXPECTED_FAILURES = re.compile(r"Failed to load resource: (the server responded with a status of (400|401|429) "
                               r"|net::ERR_CONNECTION_REFUSED$)")


@pytest.fixture(scope="module")
def models_dir(tiny_model):
    """models/page: wide enough that 1000 tokens take a few seconds, so that Stop comes before the end."""
    make_model_folder(tiny_model.parent / "page", n_ctx=1024, n_embd=384, n_head=6, n_layer=6)
    return tiny_model.parent


@pytest.fixture(scope="module")
def server(models_dir):
    served = Served(models_dir, "--max_batch", "2", model="page")
    yield served
    served.stop()


@pytest.fixture(scope="module")
def model(models_dir):
    return gpt2.GPT2.from_folder(models_dir / "page")


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no browser at {CHROMIUM}: install Debian's chromium (apt-get install chromium), as .ci/run does")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    folder = os.environ.get("GPT2_TEST_ARTIFACTS") or str(tmp_path_factory.mktemp("page-artifacts"))
    os.makedirs(folder, exist_ok=True)
    print(f"screenshots of the page go to {folder}")
    return folder


@pytest.fixture
def open_page(browser, artifacts, request):
    """open_page(server): a new tab showing the server's page, once the page says the server is ready
    (or at once, with ready=False)."""
    context = browser.new_context()
    problems = []

    def console(message):
        # Chromium logs each answer other than 2xx as "Failed to load resource"; the page is meant
        # to meet these (400, 401, 429, a server gone) and shows them itself.
        if message.type == "error" and not EXPECTED_FAILURES.match(message.text):
            problems.append(f"console: {message.text} at {message.location}")

    def open_page(server, ready=True):
        page = context.new_page()
        page.on("console", console)
        page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
        page.on("request", lambda r: r.url.startswith(server.url + "/") or problems.append(f"request: {r.url}"))
        page.goto(server.url + "/")
        if ready:
            expect(page.locator("#state")).to_have_attribute("data-state", "ready")
        return page

    yield open_page
    for page in context.pages:
        page.screenshot(path=os.path.join(artifacts, f"{request.node.name}.png"), full_page=True)
    context.close()
    assert not problems


def write(page, text, **settings):
    """Types `text` at the end of the page's text and fills in the settings, by their request field names."""
    page.locator("#text").click()
    page.keyboard.press("Control+End")
    page.keyboard.type(text)
    for name, value in settings.items():
        page.locator(f"input[name={name}]").fill(str(value))


def generate(page):
    """Ctrl+Enter, then waits until the page is ready for the next."""
    page.keyboard.press("Control+Enter")
    expect(page.locator("#generate")).to_be_enabled(timeout=60_000)


def generated(page, where="#text"):
    """The text of the model's tokens in `where`, in order."""
    return "".join(page.locator(f"{where} .token").all_text_contents())


def text_of(page):
    return page.locator("#text").evaluate("element => element.textContent")


def test_a_seed_gives_the_text_of_generate_with_each_tokens_alternatives(open_page, server, model):
    page = open_page(server)
    expect(page.locator("#model-name")).to_have_text("page")
    write(page, PROMPT, max_tokens=30, seed=7)
    generate(page)
    [sample] = model.generate(PROMPT, 30, seed=7, top_k=TOP_K, logprobs=5)
    assert generated(page) == sample.text and text_of(page) == PROMPT + sample.text
    assert page.locator("#error").is_hidden()
    expect(page.locator("#speed")).to_contain_text(f"{len(sample.tokens)} tokens in ")

    # Hovering a token shows its probability and its place's five likeliest tokens, as the model has them.
    page.locator("#text .token").nth(2).hover()
    tip = page.locator("#tip")
    expect(tip).to_be_visible()
    shown = tip.locator("li").all_text_contents()
    likeliest = [token_name(model, token) for token, _ in sample.top_logprobs[2]]
    assert len(shown) == 5
    for line, token in zip(shown, likeliest):
        assert line.startswith(token.replace(" ", "␣").replace("\n", "↵") + " ")

    # Colour by probability: each token's background says how likely it was.
    page.locator("#by-probability").check()
    colours = page.locator("#text .token").evaluate_all("spans => spans.map(s => getComputedStyle(s).backgroundColor)")
    assert len(set(colours)) > 1 and "rgba(0, 0, 0, 0)" not in colours


def test_several_choices_side_by_side_then_one_is_edited_and_continued(open_page, server, model):
    page = open_page(server)
    write(page, PROMPT, max_tokens=15, seed=3, n=2)
    generate(page)
    samples = model.generate(PROMPT, 15, seed=3, top_k=TOP_K, nsamples=2)
    assert [generated(page, f".choice:nth-child({i})") for i in (1, 2)] == samples
    assert text_of(page) == PROMPT  # the choices wait to be picked

    page.get_by_role("button", name="Use choice 2").click()
    expect(page.locator(".choice")).to_have_count(0)
    tokens = page.locator("#text .token").count()
    # Typed after the last token: the person's text, outside it (the tokens stay the model's).
    write(page, " and then", n=1, seed=5, max_tokens=10)
    assert text_of(page) == PROMPT + samples[1] + " and then"
    assert page.locator("#text .token").count() == tokens and generated(page) == samples[1]

    generate(page)  # the whole text, as edited, is the prompt
    edited = PROMPT + samples[1] + " and then"
    answer = server.post("/v1/completions", {"prompt": edited, "max_tokens": 10, "seed": 5, "top_k": TOP_K})
    assert text_of(page) == edited + answer.json()["choices"][0]["text"]


def test_stop_ends_the_stream_and_the_server_frees_its_row(open_page, server):
    page = open_page(server)
    before = server.metric("gpt2_generation_tokens_total")
    write(page, PROMPT, max_tokens=1000, seed=1)  # this seed makes 1000 tokens without <|endoftext|>
    page.keyboard.press("Control+Enter")
    lengths = [0]
    deadline = time.monotonic() + 120
    while len(lengths) < 3:  # the text grows while it streams
        assert time.monotonic() < deadline and page.locator("#stop").is_enabled(), "the text did not grow"
        length = len(generated(page))
        if length > lengths[-1]:
            lengths.append(length)
    page.keyboard.press("Escape")
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#speed")).to_contain_text("(stopped)")
    assert page.locator("#error").is_hidden()
    deadline = time.monotonic() + 30
    while server.metric("gpt2_rows_in_use") > 0:
        assert time.monotonic() < deadline, "the row was not freed"
        time.sleep(0.05)
    assert server.metric("gpt2_requests_running") == 0
    assert server.metric("gpt2_generation_tokens_total") - before < 1000  # stopped long before its end


def test_a_bad_request_shows_the_servers_message(open_page, server):
    page = open_page(server)
    write(page, PROMPT, max_tokens=5000)
    generate(page)
    error = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 5000}).json()["error"]
    expect(page.locator("#error")).to_have_text(error["message"])


def test_the_page_fits_a_phone(open_page, server):
    page = open_page(server)
    page.set_viewport_size({"width": 375, "height": 740})
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    text, settings = page.locator("#text").bounding_box(), page.locator(".controls").bounding_box()
    assert settings["y"] >= text["y"] + text["height"]  # the settings go under the text


@pytest.fixture
def keyed_server(models_dir):
    """One row, one waiting request, and an API key."""
    served = Served(models_dir, "--max_batch", "1", "--max_queue", "1", "--api_key",
                    KEY["Authorization"].removeprefix("Bearer "), model="page")
    yield served
    served.stop()


def test_the_key_is_asked_once_a_full_queue_is_busy_and_a_lost_server_is_said(open_page, keyed_server):
    assert keyed_server.http.get("/").status_code == 200  # the page needs no key: it asks for it
    page = open_page(keyed_server, ready=False)
    expect(page.locator("#key-dialog")).to_be_visible()
    page.locator("#key").fill(KEY["Authorization"].removeprefix("Bearer "))
    page.get_by_role("button", name="Use the key").click()
    expect(page.locator("#state")).to_have_attribute("data-state", "ready")
    expect(page.locator("#model-name")).to_have_text("page")
    page.reload()  # kept for the tab
    expect(page.locator("#state")).to_have_attribute("data-state", "ready")
    expect(page.locator("#key-dialog")).to_be_hidden()

    long = {"prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        pool.submit(streamed_with_key, keyed_server, long)
        while keyed_server.metric("gpt2_rows_in_use", headers=KEY) < 1:
            time.sleep(0.01)
        pool.submit(keyed_server.post, "/v1/completions", {"prompt": "A", "max_tokens": 3}, headers=KEY)
        while keyed_server.metric("gpt2_requests_waiting", headers=KEY) < 1:
            time.sleep(0.01)
        write(page, PROMPT)
        generate(page)
        expect(page.locator("#error")).to_have_text("The server is busy: try again in 1 s.")
        expect(page.locator("#state")).to_have_attribute("data-state", "busy")
        expect(page.locator("#state")).to_have_text("busy: 1 of 1 rows in use, 1 waiting")

        keyed_server.stop()  # the requests above fail with it
    expect(page.locator("#state")).to_have_text("connection lost")
    generate(page)
    expect(page.locator("#error")).to_contain_text("Connection lost")
