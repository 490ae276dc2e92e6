"""``batchgen gallery`` on a real finished run, checked in a real headless browser (Debian's chromium driven by
playwright): the page loads with no console errors, shows the expected cards with their thumbnails, and pages."""

from __future__ import annotations

import io
import json

import av
import numpy as np
import pytest

from batchgen.cli import main
from batchgen.core.video import encode_mp4
from batchgen.dataset import open_run
from batchgen.dataset.gallery import contact_sheet, write_gallery
from batchgen.storage import LocalStorage, open_storage
from tests._datasets import BLACK_ITEM, RUN_ITEMS, finished_run
from tests.fixtures.ci import required_tool


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_config, tiny_model_dir):
    folder = tmp_path_factory.mktemp("dataset")
    storage = LocalStorage(folder / "out")
    return storage.root / finished_run(storage, folder, tiny_config, tiny_model_dir).run_id


def test_contact_sheet_is_a_strip_of_evenly_spaced_frames():
    frames = np.zeros((13, 64, 96, 3), np.uint8)
    for index in range(13):
        frames[index] = index * 19  # each frame its own grey level
    sheet = _decode_jpeg(contact_sheet(encode_mp4(frames, 30, 0), frames=4, height=32))
    assert sheet.shape == (32, 4 * 48, 3)
    levels = [int(sheet[16, 24 + 48 * i].mean()) for i in range(4)]
    assert [round(level / 19) for level in levels] == [0, 4, 8, 12]  # frames 0, 4, 8, 12


def _decode_jpeg(jpeg: bytes) -> np.ndarray:
    assert jpeg[:2] == b"\xff\xd8" and jpeg[-2:] == b"\xff\xd9"  # a complete JPEG
    with av.open(io.BytesIO(jpeg), format="jpeg_pipe") as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24")


def test_gallery_in_headless_chromium(run_dir, tmp_path, capsys):
    from playwright.sync_api import sync_playwright

    chromium = required_tool("chromium", "chromium-browser")
    out = tmp_path / "gallery"
    assert main(["gallery", str(run_dir), "--out", str(out), "--page-size", "2"]) == 0
    assert f"{RUN_ITEMS} videos (1 flagged) on 3 page(s), {RUN_ITEMS} new thumbnail(s)" in capsys.readouterr().out

    ids = open_run(str(run_dir)).index().column("id").to_pylist()
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("requestfailed", lambda request: problems.append(f"failed to load {request.url}"))
        page.goto((out / "index.html").as_uri())
        assert _shown(page, 1) == ids[:2]
        page.click("#next")
        assert _shown(page, 2) == ids[2:4]
        flagged = page.locator(f'.card[data-id="{BLACK_ITEM}"]')
        assert flagged.locator(".flag").all_text_contents() == ["black", "frozen"]
        assert "a hummingbird" not in flagged.inner_text()  # prompt text, not another item's
        page.goto((out / "index.html").as_uri() + "#page=3")
        assert _shown(page, 3) == ids[4:]
        card = page.locator(".card").first
        assert "seed 4" in card.inner_text() and "7 frames, 32x32, 30 fps" in card.inner_text()
        assert card.locator("a.video").get_attribute("href").endswith("/clip.4.mp4")
        assert page.locator("#next").is_disabled()
        browser.close()
    assert problems == []


def _shown(page, number: int) -> list[str]:
    page.wait_for_selector(f'#cards[data-page="{number}"]')
    page.wait_for_function("[...document.images].every(image => image.complete && image.naturalWidth > 0)")
    return page.eval_on_selector_all(".card", "cards => cards.map(card => card.dataset.id)")


def test_gallery_of_an_s3_run_to_s3_and_rerun_makes_no_thumbnails(run_dir, s3_uri):
    runs = open_storage(f"{s3_uri}/runs")
    for path in sorted(p for p in run_dir.parent.rglob("*") if p.is_file()):  # the finished run, copied to S3
        runs.put_file(path.relative_to(run_dir.parent).as_posix(), path)
    run = open_run(f"{s3_uri}/runs/{run_dir.name}")
    out = open_storage(f"{s3_uri}/gallery")
    first = write_gallery(run, out, sample=3, seed=1)
    assert (first["videos"], first["pages"], first["thumbnails_made"]) == (3, 1, 3)
    keys = {info.key for info in out.list("")}
    assert {"index.html", "data/page-00001.js"} <= keys and len([k for k in keys if k.startswith("thumbs/")]) == 3
    cards = _page_cards(out)
    assert all(card["href"] is None and card["uri"].startswith(f"{s3_uri}/runs/") for card in cards)

    again = write_gallery(run, out, sample=3, seed=1, link_base="https://cdn.example/runs/")
    assert again["thumbnails_made"] == 0
    assert [card["href"] for card in _page_cards(out)] == [
        f"https://cdn.example/runs/{run_dir.name}/videos/{card['uri'].split('/videos/')[1]}" for card in cards
    ]


def _page_cards(out) -> list[dict]:
    script = out.get_bytes("data/page-00001.js").decode()
    return json.loads(script[script.index("[") : script.rindex("]") + 1])
