"""The search page (GET / of the search service) in a real headless Chromium, driven by Playwright.

The page talks to the session's search service (real Ray Serve on 127.0.0.1, a table built by the
index job): the tests compare what it shows with what the service answers for the same request
body, search by a product's own stored photo, upload a file that is not an image, and filter.
One browser serves the module; every test gets a fresh page. The browser is, in this order: the
Chromium binary that $BLIP_CHROMIUM names, Debian's /usr/bin/chromium (`apt-get install chromium`,
which .ci/run does), or Playwright's own (`python -m playwright install chromium`). Without any
of them these tests fail, they do not skip.
"""

from __future__ import annotations

import base64
import math
import os
from pathlib import Path
from types import SimpleNamespace

import httpx
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipelines.indexing import tables

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

CHROMIUM_ENV = "BLIP_CHROMIUM"  # a path to a Chromium binary: tried first
DEBIAN_CHROMIUM = "/usr/bin/chromium"
NO_CHROMIUM = (
    "no Chromium for the search page tests; any one of these gives one: "
    f"set {CHROMIUM_ENV} to the path of a Chromium binary; "
    f"install Debian's {DEBIAN_CHROMIUM} (as root: apt-get install -y --no-install-recommends "
    "chromium; .ci/run installs it); or install Playwright's own (python -m playwright install chromium)"
)
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The page after a query; `make screenshot` points this at docs/search_page.png (the README's).
SCREENSHOT = Path(
    os.environ.get("BLIP_SCREENSHOT")
    or Path(__file__).resolve().parents[1] / "artifacts" / "search_page.png"
)
PAGE_K = 20  # what the page asks for
WAIT_MS = 60_000  # a 2-core CI machine runs Ray, Serve and the browser together


def chromium_executable(playwright) -> str | None:
    """The Chromium to launch: $BLIP_CHROMIUM, else Debian's, else None for Playwright's own
    install. Fails the test (never skips) when there is none."""
    named = os.environ.get(CHROMIUM_ENV, "").strip()
    if named:
        if not Path(named).is_file():  # a typo should not quietly fall through to another browser
            pytest.fail(f"{CHROMIUM_ENV}={named!r} is not a file: {NO_CHROMIUM}", pytrace=False)
        return named
    if Path(DEBIAN_CHROMIUM).exists():
        return DEBIAN_CHROMIUM
    if Path(playwright.chromium.executable_path).exists():
        return None  # Playwright launches its own
    pytest.fail(NO_CHROMIUM, pytrace=False)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "the Python package playwright is missing: pip install -c constraints/ci.txt -e '.[dev]'",
            pytrace=False,
        )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_executable(p), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US")
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    yield page
    context.close()


@pytest.fixture(scope="module")
def client(search_url):
    with httpx.Client(base_url=search_url, timeout=60) as c:
        yield c


def _rows(cfg, client):
    """The products table at the version the service serves now."""
    version = client.get("/healthz").json()["table_version"]
    db = tables.connect(cfg.index.uri)
    table = db.open_table(tables.published_run(db)["products_table"])
    table.checkout(version)
    return table.to_arrow()


def _is_search(response) -> bool:
    return response.url.endswith("/search") and response.request.method == "POST"


def _search(page, action):
    """Do ``action`` (which makes the page search); wait for the answer and for the page to show
    it. Returns the Playwright response (its request is what the page sent)."""
    with page.expect_response(_is_search, timeout=WAIT_MS) as info:
        action()
    page.wait_for_function("document.querySelector('#results').dataset.state !== 'loading'")
    return info.value


def _cards(page) -> list[dict]:
    return page.eval_on_selector_all(
        "#results .result",
        """cards => cards.map(c => ({
            id: c.dataset.productId,
            pid: c.querySelector('.pid').textContent,
            title: c.querySelector('.title').textContent,
            category: (c.querySelector('.category') || {}).textContent || null,
            price: (c.querySelector('.price') || {}).textContent || null,
            itc: c.querySelector('.itc').textContent,
            itm: c.querySelector('.itm').textContent,
            score: c.querySelector('.score').textContent,
        }))""",
    )


def _wait_thumbnails(page) -> list[int]:
    """Wait until every result image finished loading; their naturalWidth values."""
    page.wait_for_function(
        "[...document.querySelectorAll('#results .result img')].every(i => i.complete)"
    )
    return page.eval_on_selector_all(
        "#results .result img", "imgs => imgs.map(i => i.naturalWidth)"
    )


def _close(shown: str, value: float | None) -> bool:
    if value is None:
        return shown == "—"
    return abs(float(shown) - value) <= 0.0015  # shown with 3 decimals


def _decisive_query(cfg, client) -> tuple[str, dict]:
    """A held-out shopper query (汉字 first: it exercises CJK input) whose first result leads the
    second by a clear margin, so the page's first card is determined; with the service's answer."""
    queries = pq.read_table(Path(cfg.source.uri).parent / "queries.parquet")
    for lang in ("zh", "en", "pinyin"):
        part = queries.filter(pc.equal(queries.column("lang"), lang))
        for text in part.column("query").to_pylist()[:10]:
            want = client.post("/search", json={"text": text, "k": PAGE_K}).json()
            scores = [x["score"] for x in want["results"]]
            if len(scores) == PAGE_K and scores[0] - scores[1] > 1e-3:
                return text, want
    raise AssertionError("no held-out query with a clear first result")


# ------------------------------------------------------------------ tests
def _fake_playwright(tmp_path, installed: bool):
    own = tmp_path / "ms-playwright" / "chrome"
    if installed:
        own.parent.mkdir(exist_ok=True)
        own.write_text("")
    return SimpleNamespace(chromium=SimpleNamespace(executable_path=str(own)))


def test_chromium_is_found_in_order(monkeypatch, tmp_path):
    named = tmp_path / "my-chromium"
    named.write_text("")
    debian = tmp_path / "debian-chromium"
    debian.write_text("")
    monkeypatch.setattr(f"{__name__}.DEBIAN_CHROMIUM", str(debian))
    monkeypatch.setenv(CHROMIUM_ENV, str(named))
    assert chromium_executable(_fake_playwright(tmp_path, installed=True)) == str(named)
    monkeypatch.delenv(CHROMIUM_ENV)
    assert chromium_executable(_fake_playwright(tmp_path, installed=True)) == str(debian)
    debian.unlink()
    assert chromium_executable(_fake_playwright(tmp_path, installed=True)) is None


def test_no_chromium_fails_naming_every_way(monkeypatch, tmp_path):
    monkeypatch.setattr(f"{__name__}.DEBIAN_CHROMIUM", str(tmp_path / "none"))
    monkeypatch.delenv(CHROMIUM_ENV, raising=False)
    with pytest.raises(pytest.fail.Exception) as err:
        chromium_executable(_fake_playwright(tmp_path, installed=False))
    for way in (CHROMIUM_ENV, "apt-get install", "playwright install chromium"):
        assert way in str(err.value)
    monkeypatch.setenv(CHROMIUM_ENV, str(tmp_path / "typo"))  # named but missing: no fallback
    with pytest.raises(pytest.fail.Exception, match="is not a file"):
        chromium_executable(_fake_playwright(tmp_path, installed=True))


def test_text_query_shows_the_services_ranking(page, search_index, search_url, client):
    cfg, _ = search_index
    text, want = _decisive_query(cfg, client)
    page.goto(search_url + "/")
    page.fill("#q", text)
    response = _search(page, lambda: page.click("#go"))
    assert response.status == 200
    assert response.request.post_data_json == {"text": text, "k": PAGE_K}
    got = response.json()
    assert got["results"][0]["product_id"] == want["results"][0]["product_id"]

    cards = _cards(page)
    assert len(cards) == PAGE_K
    assert [c["id"] for c in cards] == [x["product_id"] for x in got["results"]]
    first, expected = cards[0], got["results"][0]
    assert first["id"] == first["pid"] == want["results"][0]["product_id"]
    assert first["title"] == expected["title"]
    assert first["price"] == f"{expected['metadata']['price']:.2f}"
    for card, x in zip(cards, got["results"], strict=True):
        assert _close(card["itc"], x["itc_score"]) and _close(card["score"], x["score"])
        assert _close(card["itm"], x["itm_score"])
    assert cards[0]["itm"] != "—"  # text queries are re-ranked by ITM
    widths = _wait_thumbnails(page)
    assert widths[0] > 0, "the first result's thumbnail did not load"
    assert all(w > 0 for w in widths)

    timings = page.inner_text("#timings")
    for stage in ("encode", "ann", "rerank", "total"):
        assert stage in timings
    assert page.inner_text("#table-version") == str(got["table_version"])
    assert page.inner_text("#request-id") == got["request_id"] == response.headers["x-request-id"]
    assert page.is_hidden("#error")

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.exists() and SCREENSHOT.stat().st_size > 0


def test_photo_upload_finds_its_own_product(page, search_index, search_url, client, tmp_path):
    cfg, _ = search_index
    rows = _rows(cfg, client)
    page.goto(search_url + "/")
    for i in (0, 33):
        pid = rows.column("product_id")[i].as_py()
        raw = rows.column("model_image")[i].as_py()
        photo = tmp_path / f"photo-{i}.jpg"
        photo.write_bytes(raw)
        # Choosing a photo searches at once (no text: image-only, ITC order, no ITM).
        response = _search(page, lambda p=photo: page.set_input_files("#image", str(p)))
        assert response.status == 200
        assert response.request.post_data_json == {
            "image": base64.b64encode(raw).decode(),
            "k": PAGE_K,
        }
        cards = _cards(page)
        assert len(cards) == PAGE_K
        assert pid in [c["id"] for c in cards[:3]], (pid, [c["id"] for c in cards[:3]])
        assert all(c["itm"] == "—" for c in cards)
        assert page.is_visible("#image-chip") and page.inner_text("#image-name") == photo.name
        assert _wait_thumbnails(page)[0] > 0
    # The photo can be removed; a text query then runs without it.
    page.fill("#q", "lamp")
    response = _search(page, lambda: page.click("#clear-image"))
    assert response.request.post_data_json == {"text": "lamp", "k": PAGE_K}
    assert page.is_hidden("#image-chip") and len(_cards(page)) == PAGE_K


def test_bad_upload_and_network_errors_are_shown(page, search_url, tmp_path):
    page.goto(search_url + "/")
    page.fill("#q", "sofa")
    assert _search(page, lambda: page.press("#q", "Enter")).status == 200
    assert len(_cards(page)) == PAGE_K

    fake = tmp_path / "holiday.jpg"
    fake.write_text("this is a text file, not a photo\n")
    page.fill("#q", "")
    response = _search(page, lambda: page.set_input_files("#image", str(fake)))
    assert response.status == 400
    message = response.json()["error"]
    assert "could not be decoded" in message
    assert page.is_visible("#error")
    shown = page.inner_text("#error")
    assert message in shown and "400" in shown
    assert _cards(page) == []  # the previous results are gone
    assert page.get_attribute("#results", "data-state") == "error"
    assert page.inner_text("#request-id") == response.json()["request_id"]
    assert page.is_hidden("#image-chip")  # the refused photo is dropped

    # The page still works: a good query gets results and clears the error.
    page.fill("#q", "chair")
    response = _search(page, lambda: page.click("#go"))
    assert response.status == 200 and response.request.post_data_json == {
        "text": "chair",
        "k": PAGE_K,
    }
    assert len(_cards(page)) == PAGE_K and page.is_hidden("#error")

    # Nothing to search: a message, no request.
    page.fill("#q", "   ")
    page.click("#go")
    assert "Type a query" in page.inner_text("#error")

    # The service unreachable: a network error message, no results.
    page.route("**/search", lambda route: route.abort())
    page.fill("#q", "table")
    page.click("#go")
    page.wait_for_selector("#results[data-state=error]", state="attached")
    assert "Network error" in page.inner_text("#error") and _cards(page) == []
    page.unroute("**/search")
    page.fill("#q", "table")
    assert _search(page, lambda: page.click("#go")).status == 200
    assert page.is_hidden("#error") and len(_cards(page)) == PAGE_K


def test_category_and_price_filters(page, search_url, client):
    facets = client.get("/facets").json()["facets"]
    categories = facets["category"]["values"]
    top = client.post("/search", json={"text": "sofa", "k": PAGE_K}).json()["results"]
    # a category other than the unfiltered first result's, so the filter changes the answer
    shown = [x["metadata"]["category"] for x in top]
    category = next((c for c in shown if c != shown[0]), categories[0])
    within = client.post(
        "/search",
        json={"text": "sofa", "k": 50, "filter": f"category = '{category}'"},
    ).json()["results"]
    prices = sorted(x["metadata"]["price"] for x in within)
    assert prices, category
    lo, hi = math.floor(prices[0]), math.ceil(prices[len(prices) // 2])

    page.goto(search_url + "/")
    page.wait_for_selector("#category[data-loaded=true]")
    options = page.eval_on_selector_all("#category option", "os => os.map(o => o.value)")
    assert options == ["", *categories]
    assert page.get_attribute("#price-min", "min") == str(math.floor(facets["price"]["min"]))
    assert page.get_attribute("#price-max", "max") == str(math.ceil(facets["price"]["max"]))
    page.select_option("#category", category)
    page.fill("#price-min", str(lo))
    page.fill("#price-max", str(hi))
    page.fill("#q", "sofa")
    response = _search(page, lambda: page.click("#go"))
    sent = response.request.post_data_json
    assert sent["filter"] == f"category = '{category}' AND price >= {lo} AND price <= {hi}"
    assert response.status == 200
    cards = _cards(page)
    assert cards and [c["id"] for c in cards] == [
        x["product_id"] for x in response.json()["results"]
    ]
    for card in cards:
        assert card["category"] == category
        assert lo <= float(card["price"]) <= hi

    # Changing a filter after a search runs it again; clearing the filters drops `filter`.
    response = _search(page, lambda: page.select_option("#category", ""))
    assert response.request.post_data_json["filter"] == f"price >= {lo} AND price <= {hi}"
    response = _search(page, lambda: page.click("#reset-filters"))
    assert "filter" not in response.request.post_data_json

    # Quotes in a value are doubled (a category that does not exist: no results, no error).
    page.eval_on_selector("#category", 's => s.add(new Option("kids\' toys", "kids\' toys"))')
    response = _search(page, lambda: page.select_option("#category", "kids' toys"))
    assert response.request.post_data_json["filter"] == "category = 'kids'' toys'"
    assert response.status == 200 and _cards(page) == []
    assert "No products match" in page.inner_text("#results") and page.is_hidden("#error")

    # A minimum above the maximum is refused on the page, without a request.
    page.fill("#price-min", "50")
    page.fill("#price-max", "10")
    page.click("#go")
    assert "minimum price is above the maximum" in page.inner_text("#error")


def test_relative_urls_under_a_route_prefix(page, search_url):
    """Served under /shop (a Serve route prefix), the page calls /shop/search, /shop/facets and
    /shop/products/…: here the browser forwards /shop/* to the service at / to show it."""
    seen: list[str] = []

    prefix = search_url + "/shop"

    def forward(route):
        url = route.request.url
        seen.append(url[len(search_url) :])
        route.continue_(url=search_url + (url[len(prefix) :] or "/"))

    page.route(lambda url: url.startswith(prefix), forward)
    page.goto(search_url + "/shop")  # no trailing slash: the page still finds its root
    page.wait_for_selector("#category[data-loaded=true]")
    page.fill("#q", "lamp")
    assert _search(page, lambda: page.click("#go")).status == 200
    assert len(_cards(page)) == PAGE_K and _wait_thumbnails(page)[0] > 0
    assert "/shop/facets" in seen and "/shop/search" in seen
    assert any(p.startswith("/shop/products/") and p.endswith("/thumbnail") for p in seen)
