"""The dashboard at /ui in a real browser (Debian's chromium driven by Playwright; no browser download):
it asks for the token and honours it, lists the datasets and the ingests in progress, shows a running job
and its workers updating, and its batch inspector marks exactly the positions the served batch's labels
select.

With UPDATE_UI_SCREENSHOTS=1 it also writes docs/ui/jobs.png and docs/ui/inspector.png."""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import SecretStr

from client import Client, decode

from .conftest import ROOT, ServerThread

playwright = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (the dev extra)")
CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")

TOKEN = "ui-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SEQ_LEN = 64
SHOTS = ROOT / "docs" / "ui"


@pytest.fixture
def served(settings, rdb, bpe_tokenizer, corpus) -> Iterator[tuple[str, str, str]]:
    """A service that needs a token, a dataset with a static-mask cache, and a job with one worker training."""
    with ServerThread(settings.model_copy(update={"auth_token": SecretStr(TOKEN)})) as s:
        name = f"ui-{uuid.uuid4().hex[:6]}"
        job = f"{name}-job"
        stop = threading.Event()
        with Client(s.url, token=TOKEN) as c:
            c.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN)
            c.ingest(name, corpus[:120])
            c.build_static_masks(name, seed=3, copies=2)
            c.create_job(job, name, batch_size=4, epochs=1000, lease_timeout_s=120)

            def train() -> None:
                with Client(s.url, token=TOKEN) as w, w.job(job, worker="worker-1", stats_every=0.5) as stream:
                    for _ in stream:
                        if stop.wait(0.1):  # its training step
                            break

            worker = threading.Thread(target=train)
            worker.start()
            try:
                yield s.url, name, job
            finally:
                stop.set()
                worker.join(60)


@pytest.fixture
def browser() -> Iterator:
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _shot(page, name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    if os.environ.get("UPDATE_UI_SCREENSHOTS"):
        SHOTS.mkdir(exist_ok=True)
        shutil.copy(path, SHOTS / name)


def test_without_the_token_the_page_says_it_needs_it(served, browser):
    url, name, _ = served
    page = browser.new_page()
    page.goto(f"{url}/ui")
    page.wait_for_selector("#error:not([hidden])")
    assert "bearer token" in page.text_content("#error")
    assert page.query_selector(f'tr[data-dataset="{name}"]') is None  # nothing was shown without it
    page.fill("#token", TOKEN)
    page.click("#token-form button")
    page.wait_for_selector(f'tr[data-dataset="{name}"]')
    assert page.is_hidden("#error")


def test_the_dashboard_shows_datasets_a_live_job_and_inspects_a_batch(served, browser, tmp_path):
    url, name, job = served
    context = browser.new_context(viewport={"width": 1300, "height": 900})
    context.add_init_script(f"sessionStorage.setItem('maskserve-token', '{TOKEN}')")  # entered earlier in this tab
    problems: list[str] = []
    page = context.new_page()
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(f"{url}/ui")
    row = page.wait_for_selector(f'tr[data-dataset="{name}"]')
    info = httpx.get(f"{url}/v1/datasets/{name}", headers=AUTH).json()
    cells = row.query_selector_all("td")
    assert cells[2].text_content().replace(",", "") == str(info["num_sequences"])
    assert "K=2, complete" in cells[6].text_content()

    page.click('nav button[data-tab="jobs"]')
    page.wait_for_selector(f'[data-job="{job}"] tr[data-worker="worker-1"]')
    first = int(page.text_content(f'[data-job="{job}"] .acked').replace(",", ""))
    # the page polls the job: its acked count moves on as the worker trains (waits on the page, not a clock)
    page.wait_for_function(
        "([job, first]) => Number(document.querySelector(`[data-job='${job}'] .acked`).textContent.replace(/,/g, '')) > first",
        arg=[job, first], timeout=60_000)  # fmt: skip
    page.wait_for_function(
        "(job) => document.querySelector(`[data-job='${job}'] tr[data-worker='worker-1']`).children[4].textContent !== ''",
        arg=job, timeout=60_000)  # fmt: skip  (the worker's data-wait share, from its summaries)
    page.wait_for_selector("#throughput[data-points='4']", timeout=60_000)  # the chart has a line to show
    _shot(page, "jobs.png", tmp_path)

    page.click('nav button[data-tab="inspector"]')
    page.wait_for_selector(f'#i-dataset option[value="{name}"]', state="attached")
    page.select_option("#i-dataset", name)
    options = {"size": "3", "seed": "11", "index": "2", "mlm_probability": "0.3"}
    for field, value in options.items():
        page.fill(f'#inspect-form [name="{field}"]', value)
    page.select_option('#inspect-form [name="unit"]', "whole_word")
    page.click("#inspect-form button")
    page.wait_for_selector(".row")
    shown = page.evaluate("""() => [...document.querySelectorAll('.row')].map(r =>
        [...r.querySelectorAll('.tok')].map(t => [Number(t.dataset.pos), t.dataset.kind]))""")
    _shot(page, "inspector.png", tmp_path)
    assert problems == []

    # the same batch, as any client gets it: every selected position marked, and marked as what it is
    r = httpx.get(f"{url}/v1/datasets/{name}/batch", headers=AUTH,
                  params={**options, "unit": "whole_word", "count": "bernoulli", "mode": "dynamic", "labels": "dense"})
    arrays, _ = decode(r.content)
    mask_id = info["special_tokens"]["mask"]
    assert len(shown) == 3
    for row_shown, ids, labels, attention in zip(shown, arrays["input_ids"], arrays["labels"], arrays["attention_mask"]):
        expected = []
        for c in np.flatnonzero(attention):
            label, token = int(labels[c]), int(ids[c])
            kind = "none" if label == -100 else "masked" if token == mask_id else "kept" if token == label else "replaced"
            expected.append([int(c), kind])
        assert row_shown == expected
    kinds = {k for row_shown in shown for _, k in row_shown}
    assert {"masked", "none"} <= kinds


def test_the_datasets_page_shows_an_ingest_in_progress(served, browser, corpus):
    """An ingest held half-sent shows on the datasets page (it polls), with what it received so far; once it
    ends, it goes."""
    from .test_ingest_progress import HeldBody

    url, name, _ = served
    body = HeldBody(corpus[:200])
    done = threading.Event()

    def upload() -> None:
        with httpx.Client(timeout=120, headers=AUTH) as h:
            h.post(f"{url}/v1/datasets/{name}/documents", content=iter(body),
                   headers={"Content-Type": "application/x-ndjson", "Idempotency-Key": "ui-held"})  # fmt: skip
        done.set()

    context = browser.new_context()
    context.add_init_script(f"sessionStorage.setItem('maskserve-token', '{TOKEN}')")
    page = context.new_page()
    page.goto(f"{url}/ui")
    page.wait_for_selector("#no-ingests:not([hidden])")
    thread = threading.Thread(target=upload)
    thread.start()
    try:
        row = page.wait_for_selector(f'tr[data-ingest][data-dataset="{name}"]', timeout=60_000)
        cells = [c.text_content() for c in row.query_selector_all("td")]
        assert cells[0] == name and cells[-1] == "ui-held"
        # what arrived of the body so far (the first part), once the ingest's record is refreshed
        page.wait_for_function(
            "(name) => { const r = document.querySelector(`tr[data-ingest][data-dataset='${name}']`);"
            " return r && r.children[1].textContent.includes('KiB'); }", arg=name, timeout=60_000)  # fmt: skip
    finally:
        body.release.set()
        thread.join(120)
    assert done.is_set()
    page.wait_for_selector(f'tr[data-ingest][data-dataset="{name}"]', state="detached", timeout=60_000)
    assert page.is_visible("#no-ingests")
