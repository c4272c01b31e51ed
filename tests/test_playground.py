"""/playground: the page itself (self-contained, its security headers, the form's ranges
and defaults those of the schema), and end to end in a headless Chromium against the
simulators: fill the form, see a field error, generate, see the images and their cost,
inpaint with a painted mask, cancel a slow one, and find both in the recent list.

The browser is the Debian package `chromium` (installed when missing, skipped with the
reason only when it cannot be), driven by Playwright from PyPI with that executable:
Playwright's own browser download is never used. Every wait is bounded.
"""

from __future__ import annotations

import base64
import io
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, get_args

import httpx
import pytest
from litestar.testing import AsyncTestClient
from PIL import Image

from providers.simulators import SimulatorServer
from proxy.app import create_app
from proxy.schema import MAX_SIDE, MIN_SIDE, GenerateRequest

from ._debian import debian_binary
from ._serve import RecordingTransport, serving
from .conftest import make_settings

ADMIN = "playground-admin-key"
CHROMIUM = "/usr/bin/chromium"
INSTALL_TIMEOUT_S = 600
# No internet here: without these Chromium keeps trying to reach Google's services.
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]
FILES = ("/playground", "/playground/app.js", "/playground/app.css")
WAIT_MS = 20_000  # any one thing the page should show


# --------------------------------------------------------------------------- the page


class _Inputs(HTMLParser):
    """Every element with an id: its attributes, and the values of each select's options."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, dict[str, str | None]] = {}
        self.options: dict[str, list[str]] = {}
        self._select: str | None = None
        self.scripts: list[dict[str, str | None]] = []
        self.styled: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.links += [str(a[n]) for n in ("src", "href", "action") if n in a]
        if "style" in a:
            self.styled.append(tag)
        if tag == "script":
            self.scripts.append(a)
        if a.get("id"):
            self.by_id[str(a["id"])] = a
        if tag == "select":
            self._select = a.get("id")
            self.options[str(self._select)] = []
        elif tag == "option" and self._select:
            self.options[self._select].append(str(a.get("value")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self._select = None


def _bounds(name: str) -> tuple[Any, Any, Any]:
    field = GenerateRequest.model_fields[name]
    ge = next(m.ge for m in field.metadata if hasattr(m, "ge"))
    le = next(m.le for m in field.metadata if hasattr(m, "le"))
    return ge, le, field.default


async def test_the_page_is_self_contained_and_has_the_schema_ranges(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, {}, auth_enabled=True, admin_key=ADMIN))
    async with AsyncTestClient(app) as c:
        answers = {path: await c.get(path) for path in FILES}  # no key: the page has no data
        missing = await c.get("/playground/proxy.db")
        spec = (await c.get("/schema/openapi.json")).json()
    page = answers["/playground"]
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    for path, r in answers.items():
        assert r.status_code == 200, path
        csp = {d.split()[0]: d.split()[1:] for d in
               r.headers["content-security-policy"].split("; ")}
        assert csp["default-src"] == ["'none'"]
        assert csp["script-src"] == csp["style-src"] == csp["connect-src"] == ["'self'"]
        assert {"'self'", "data:", "blob:"} <= set(csp["img-src"])
        assert csp["frame-ancestors"] == ["'none'"]
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        # Nothing from anywhere else: every address the page uses it builds from location.
        assert "http://" not in r.text and "https://" not in r.text, path
    assert answers["/playground/app.js"].headers["content-type"].startswith("text/javascript")
    assert answers["/playground/app.css"].headers["content-type"].startswith("text/css")
    assert missing.status_code == 404
    assert not [p for p in spec["paths"] if p.startswith("/playground")]

    parsed = _Inputs()
    parsed.feed(page.text)
    # No inline script or style (the CSP would refuse them): one script, ours.
    assert [s.get("src") for s in parsed.scripts] == ["/playground/app.js"]
    assert not parsed.styled
    # Every address is a path on this proxy (or the empty data: favicon).
    assert parsed.links and all(re.fullmatch(r"/[^/].*|data:,", u) for u in parsed.links), \
        parsed.links
    for name in ("num_inference_steps", "guidance_scale", "num_images", "seed", "strength"):
        ge, le, default = _bounds(name)
        attrs = parsed.by_id[name]
        assert (float(str(attrs["min"])), float(str(attrs["max"])), float(str(attrs["value"]))) \
            == (ge, le, default), name
    for side in ("width", "height"):
        attrs = parsed.by_id[side]
        assert (attrs["min"], attrs["max"], attrs["value"]) == (str(MIN_SIDE), str(MAX_SIDE),
                                                                "1024")
    formats = get_args(GenerateRequest.model_fields["output_format"].annotation)
    assert parsed.options["output_format"] == list(formats)
    assert "selected" in parsed.by_id["output_format"] or \
        GenerateRequest.model_fields["output_format"].default == formats[0]
    for flag in ("enable_safety_checker", "enable_base64_output", "enable_sync_mode"):
        default = GenerateRequest.model_fields[flag].default
        assert ("checked" in parsed.by_id[flag]) is default, flag
    assert {"prompt", "model", "providers", "image-file", "mask-file", "mask-canvas",
            "generate", "results", "recent", "api-key"} <= set(parsed.by_id)


# --------------------------------------------------------------------------- the browser


def chromium_binary() -> str:
    """/usr/bin/chromium, installed from the Debian packages when missing (bounded)."""
    return debian_binary(CHROMIUM, ["chromium", "chromium-driver"],
                         timeout_s=INSTALL_TIMEOUT_S, recommends=True)


def _png(path: Path, size: tuple[int, int]) -> Path:
    Image.new("RGB", size, (40, 90, 160)).save(path, "PNG")
    return path


def _decode(data_uri: str) -> Image.Image:
    head, payload = data_uri.split(",", 1)
    assert head == "data:image/png;base64", head
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def _new_group(page: Any, expect: Any, count: int) -> tuple[str, Any]:
    """The result group the page added last (the `count`th): its id, and a locator by id."""
    groups = page.locator(".group")
    expect(groups).to_have_count(count)
    pid = groups.first.get_attribute("data-prediction-id")
    assert pid
    return pid, page.locator(f".group[data-prediction-id='{pid}']")


def _save_screenshot(page: Any, tmp_path: Path) -> None:
    shot = page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    target = os.environ.get("PLAYGROUND_SCREENSHOT")
    if target:
        Path(target).write_bytes(shot)


def test_generate_inpaint_cancel_and_recent_in_a_browser(
    tmp_path: Path, wavespeed_sim: SimulatorServer, vibedream_sim: SimulatorServer
) -> None:
    chromium = chromium_binary()
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright (the [test] extra) is not installed")
    expect = sync_api.expect
    expect.set_options(timeout=WAIT_MS)
    recorder = RecordingTransport()  # the bodies the proxy sent WaveSpeed
    settings = make_settings(
        tmp_path, {"wavespeed": wavespeed_sim, "vibedream": vibedream_sim},
        auth_enabled=True, admin_key=ADMIN, public_base_url="",
        # Outputs the proxy keeps: URLs on the proxy that need the key (blob: in the page).
        output_store=str(tmp_path / "outputs"))
    with serving(settings, transports={"wavespeed": recorder}) as base, \
            sync_api.sync_playwright() as pw:
        made = httpx.post(f"{base}/admin/keys", json={"name": "playground"},
                          headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
        assert made.status_code == 201, made.text
        key = made.json()["key"]
        auth = {"Authorization": f"Bearer {key}"}
        browser = pw.chromium.launch(executable_path=chromium, args=LAUNCH_ARGS,
                                     timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(WAIT_MS)
            console: list[str] = []
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            requested: list[str] = []
            page.on("request", lambda r: requested.append(r.url))

            page.goto(f"{base}/playground")
            page.fill("#api-key", key)
            page.click("#key-use")
            expect(page.locator("#key-status")).to_have_text("key accepted")
            wavespeed = page.locator("#providers input[data-provider=wavespeed]")
            expect(wavespeed).to_be_enabled()
            expect(page.locator("#providers input[data-provider=vibedream]")).to_be_enabled()

            # A bad value: the proxy's own field error, on the field.
            page.fill("#prompt", "a red fox in snow")
            page.fill("#num_inference_steps", "99")
            page.click("#generate")
            error = page.locator("#errors li[data-error-field=num_inference_steps]")
            expect(error).to_contain_text("from 1 to 50")
            expect(page.locator("#num_inference_steps.invalid")).to_have_count(1)

            # Generate: two images on WaveSpeed, with a seed.
            page.fill("#num_inference_steps", "20")
            page.fill("#guidance_scale", "4.5")
            page.fill("#num_images", "2")
            page.fill("#seed", "1234")
            page.select_option("#size-preset", "1024*768")
            page.select_option("#output_format", "png")
            wavespeed.check()
            page.click("#generate")
            expect(page.locator("#errors")).to_be_hidden()
            pid, group = _new_group(page, expect, 1)
            expect(group).to_have_attribute("data-status", "completed")
            cards = group.locator(".card")
            expect(cards).to_have_count(2)
            page.wait_for_function(
                "id => [...document.querySelectorAll(`.group[data-prediction-id='${id}'] img`)]"
                ".every(i => i.complete && i.naturalWidth > 0)", arg=pid, timeout=WAIT_MS)
            pred = httpx.get(f"{base}/v1/predictions/{pid}", headers=auth, timeout=10).json()
            assert pred["status"] == "completed" and pred["provider"] == "wavespeed"
            assert pred["seed"] == 1234 and pred["cost_usd"] == "0.024000"
            assert all(o.startswith(f"{base}/v1/predictions/{pid}/outputs/")
                       for o in pred["outputs"])
            for i in range(2):
                card = cards.nth(i)
                expect(card.locator("[data-role=provider]")).to_have_text("wavespeed")
                expect(card.locator("[data-role=seed]")).to_have_text("1234")
                expect(card.locator("[data-role=cost]")).to_contain_text(f"${pred['cost_usd']}")
                expect(card.locator("[data-role=latency]")).to_contain_text("ms")
                assert (card.locator("img").get_attribute("src") or "").startswith("blob:")
                expect(card.locator(".badge")).to_have_count(0)
            expect(group.locator("[data-role=total-cost]")).to_have_text(pred["cost_usd"])
            sent = recorder.submits[-1]
            assert (sent["seed"], sent["num_inference_steps"], sent["size"]) == \
                (1234, 20, "1024*768")

            # Inpainting: an uploaded image and a mask painted on it; in sync mode, base64.
            page.fill("#num_images", "1")
            page.check("#enable_sync_mode")
            page.check("#enable_base64_output")
            page.fill("#prompt", "the same scene in winter [sim:nsfw]")
            page.set_input_files("#image-file", str(_png(tmp_path / "in.png", (320, 256))))
            expect(page.locator("#image-info")).to_have_text("320 x 256 px")
            page.check("input[name=mask-mode][value=paint]")
            canvas = page.locator("#mask-canvas")
            expect(canvas).to_be_visible()
            box = canvas.bounding_box()
            assert box
            page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.5)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5,
                            steps=8)
            page.mouse.up()
            page.click("#generate")
            _, inpainted = _new_group(page, expect, 2)
            expect(inpainted).to_have_attribute("data-status", "completed")
            expect(inpainted.locator(".card .badge")).to_have_text("NSFW")  # [sim:nsfw]
            assert (inpainted.locator(".card img").get_attribute("src") or "").startswith(
                "data:image/png;base64,")
            sent = recorder.submits[-1]
            assert sent["image"].startswith("data:image/png;base64,")
            mask = _decode(sent["mask_image"]).convert("L")
            assert mask.size == (320, 256)  # the image's own size
            assert mask.getpixel((int(320 * 0.35), 128)) == 255  # painted: regenerate
            assert mask.getpixel((300, 20)) == 0  # untouched: keep

            # A slow one, cancelled from the page.
            page.click("#image-clear")
            page.check("input[name=mask-mode][value=none]")
            page.uncheck("#enable_sync_mode")
            page.uncheck("#enable_base64_output")
            page.fill("#prompt", "a slow lighthouse [sim:latency=30]")
            page.click("#generate")
            slow_id, slow = _new_group(page, expect, 3)
            expect(slow.locator("[data-role=provider]")).to_have_text("wavespeed")
            expect(slow.locator("[data-role=elapsed]")).not_to_have_text("")
            assert slow.get_attribute("data-status") in ("queued", "processing")
            slow.locator("button.cancel").click()
            expect(slow).to_have_attribute("data-status", "canceled")
            expect(slow.locator("[data-role=status]")).to_have_text("canceled")
            expect(slow.locator("button.cancel")).to_be_hidden()
            got = httpx.get(f"{base}/v1/predictions/{slow_id}", headers=auth, timeout=10)
            assert got.json()["status"] == "canceled"

            # The key's recent predictions, with their cost.
            page.click("#recent-refresh")
            row = page.locator(f"#recent-body tr[data-prediction-id='{pid}']")
            expect(row.locator("[data-role=cost]")).to_have_text(pred["cost_usd"])
            expect(page.locator(f"#recent-body tr[data-prediction-id='{slow_id}']")) \
                .to_have_attribute("data-status", "canceled")
            expect(page.locator("#recent-body tr")).to_have_count(3)

            # The key: in this tab's sessionStorage only, and never in an address.
            stored = page.evaluate("() => [sessionStorage.getItem('flux-proxy.playground.key'),"
                                   " localStorage.length]")
            assert stored == [key, 0]
            assert requested and not [u for u in requested if key in u]
            assert not [u for u in requested
                        if not u.startswith((f"{base}/", "blob:", "data:"))], requested
            # Nothing refused by the CSP, no script error, no failed load (but the 422 above).
            assert not [m for m in console if m.startswith(("error", "pageerror"))
                        and "status of 422" not in m], console
            _save_screenshot(page, tmp_path)
        finally:
            browser.close()
    assert (tmp_path / "playground.png").stat().st_size > 10_000
