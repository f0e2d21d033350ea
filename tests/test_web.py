"""The web page at `/` in a real browser: Debian's headless Chromium (`chromium`, `chromium-driver`, installed
by scripts/install.sh) driven by Selenium, given both paths so nothing is downloaded, against the live local
service with API keys on (one service and one browser for the module; jobs of 2-4 steps on the tiny preset).

Covered: the key field (kept in localStorage, sent as a bearer token, media fetched with it); ranges and
defaults from the OpenAPI schema; the i2v tab with an upload placed on the latent strip, its heat map the
plan endpoint's, the progress of every step, the video playing; extending the result; cancelling a slow
job while its steps advance; the multi-frames tab with two images clicked and dragged to positions; a 400
shown next to the field it names, then a text-to-video job; video-to-video from the gallery; the gallery's pages; a
long video of three windows, each window listed with its MP4 as it is done; fast mode and the LoRA picker (the
service's registry, `GET /v1/loras`, holds a random tiny distill LoRA as "distill", the fast one, and the same file as
"style"), a repeated LoRA's 400 by the picker. Each tab's screenshot goes to docs/web-<tab>.png.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file
from videoapi import image_bytes

from pusa_jobs.api_keys import KeyStore
from pusa_jobs.db import open_database
from pusa_jobs.job_store import JobStore
from pusa_model.presets import build_tiny_distill_lora_state_dict
from serving import running_service

DOCS = Path(__file__).resolve().parent.parent / "docs"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_folder):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("Debian's chromium and chromium-driver are missing: run scripts/install.sh")
    folder = tmp_path_factory.mktemp("web")
    database = f"sqlite:///{folder / 'jobs.db'}"
    api = {"auth": "keys", "cost": {"max_gpu_seconds": 100}}
    lora = folder / "distill.safetensors"
    save_file(build_tiny_distill_lora_state_dict(WanTransformer3DModel.from_pretrained(tiny_folder / "transformer")),
              str(lora))
    loras = {"distill": {"path": str(lora), "alpha": 1.0, "fast": True}, "style": {"path": str(lora), "alpha": 0.5}}
    with running_service(str(folder / "store"), api=api, database=database, args={"loras": loras}) as url:
        _, key = KeyStore(open_database(database)).create("browser", "user")
        yield SimpleNamespace(url=url, key=key, jobs=JobStore(open_database(database)),
                              headers={"Authorization": f"Bearer {key}"})


@pytest.fixture(scope="module")
def browser(service):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1360,1200",
                "--autoplay-policy=no-user-gesture-required", "--hide-scrollbars"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
        problems = [entry["message"] for entry in driver.get_log("browser")
                    if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]]
        assert not problems, problems  # no script error on the page, ever (the API's 4xx are expected)
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("media")
    paths = {}
    for name, seed in (("start", 1), ("end", 2)):
        paths[name] = folder / f"{name}.png"
        paths[name].write_bytes(image_bytes("PNG", size=(96, 72), seed=seed))
    return SimpleNamespace(**paths)


def wait(driver, predicate, timeout: float = 60, message: str = ""):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: predicate(d))
    except TimeoutException:
        (DOCS.parent / "out").mkdir(exist_ok=True)
        driver.save_screenshot(str(DOCS.parent / "out" / "test_web_failure.png"))  # what the page showed
        raise AssertionError(f"timed out: {message}") from None


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def css(driver, selector: str):
    return driver.find_element(By.CSS_SELECTOR, selector)


def field_error(driver, param: str) -> str:
    return css(driver, f'.field[data-param="{param}"] .field-error').text


def set_value(driver, selector: str, value) -> None:
    element = css(driver, selector)
    element.clear()
    if value != "":
        element.send_keys(str(value))
    else:  # clear() alone fires no input event
        js(driver, "arguments[0].dispatchEvent(new Event('input', {bubbles: true}))", element)


def open_tab(driver, task: str) -> None:
    css(driver, f"#tab-{task}").click()
    wait(driver, lambda d: css(d, f"#tab-{task}").get_attribute("aria-selected") == "true")


def cell(driver, latent: int):
    return css(driver, f'#strip .cell[data-latent="{latent}"]')


def act(driver, build) -> None:
    """Perform the pointer actions `build(ActionChains)` makes, again if a new plan redrew the strip first."""
    for attempt in range(5):
        try:
            return build(ActionChains(driver)).perform()
        except StaleElementReferenceException:
            ActionChains(driver).reset_actions()  # releases a button a partly performed chain pressed
            time.sleep(0.2)
    raise AssertionError("the strip kept changing")


def click_cell(driver, latent: int) -> None:
    act(driver, lambda chain: chain.click(cell(driver, latent)))


def heatmap(driver) -> list[list[float]]:
    return json.loads(css(driver, "#heatmap").get_attribute("data-timesteps"))


def wait_plan(driver, task: str, steps: int, check=lambda rows: True) -> list[list[float]]:
    """The heat map once it shows a plan of `task` with `steps` rows that passes `check`."""
    def ready(d):
        canvas = css(d, "#heatmap")
        if canvas.get_attribute("data-task") != task or canvas.get_attribute("data-steps") != str(steps):
            return False
        if "stale" in canvas.get_attribute("class"):
            return False
        rows = heatmap(d)
        return rows if check(rows) else False
    return wait(driver, ready, 30, f"a {task} plan of {steps} steps")


def submit_and_wait(driver, service, status: str = "completed", timeout: float = 90) -> dict:
    before = css(driver, "#job-id").text
    css(driver, "#submit").click()
    wait(driver, lambda d: css(d, "#job-id").text not in ("", before), 30, "a new job")
    return wait_job(driver, service, status, timeout)


def wait_job(driver, service, status: str = "completed", timeout: float = 90) -> dict:
    wait(driver, lambda d: css(d, "#job-status").get_attribute("data-status") in ("completed", "failed", "cancelled"),
         timeout, "the job to end")
    video_id = css(driver, "#job-id").text
    job = httpx.get(f"{service.url}/v1/videos/{video_id}", headers=service.headers, timeout=30).json()
    assert job["status"] == status, job
    assert css(driver, "#job-status").get_attribute("data-status") == status
    return job


def plays(driver, video_id: str) -> float:
    """The result's <video> is the job's MP4 (a blob URL fetched with the key), plays, and lasts > 0 s."""
    wait(driver, lambda d: css(d, "#result").get_attribute("data-video") == video_id
         and js(d, "return document.querySelector('#result-video').readyState") >= 2, 30, "the video to load")
    assert css(driver, "#result-video").get_attribute("src").startswith("blob:")
    duration = js(driver, "return document.querySelector('#result-video').duration")
    js(driver, "document.querySelector('#result-video').play()")
    wait(driver, lambda d: js(d, "const v = document.querySelector('#result-video'); return !v.paused && v.currentTime > 0"),
         20, "the video to play")
    wait(driver, lambda d: js(d, "const i = document.querySelector('#result-thumb'); return i.complete && i.naturalWidth > 0"),
         10, "the thumbnail")
    link = css(driver, "#download")
    assert link.get_attribute("download") == f"{video_id}.mp4" and link.get_attribute("href").startswith("blob:")
    return duration


def gallery(driver) -> list[str]:
    """The ids on the gallery's page, read at once (cards are rebuilt on every load)."""
    return js(driver, "return [...document.querySelectorAll('#gallery-list .card')].map(c => c.dataset.id)")


def screenshot(driver, name: str) -> None:
    js(driver, "window.scrollTo(0, 0)")
    DOCS.mkdir(exist_ok=True)
    driver.save_screenshot(str(DOCS / f"web-{name}.png"))


# -- the tests, in order: one browser session ------------------------------------------------------


def test_key_field_and_schema_ranges(browser, service):
    browser.get(f"{service.url}/")
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true", 30, "the page")
    assert css(browser, "#key-box").is_displayed()  # /health says auth: keys
    assert "API key" in field_error(browser, "api_key")
    set_value(browser, "#api-key", "not-a-key")
    css(browser, "#save-key").click()
    wait(browser, lambda d: "not valid" in field_error(d, "api_key"), 20, "the 401 next to the key field")
    set_value(browser, "#api-key", service.key)
    css(browser, "#save-key").click()
    wait(browser, lambda d: field_error(d, "api_key") == "" and css(d, "#f-frames").get_attribute("placeholder"),
         20, "the key accepted")
    browser.refresh()  # the key is kept in localStorage
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true", 30, "the page")
    assert js(browser, "return localStorage.getItem('pusa.apiKey')") == service.key
    assert css(browser, "#api-key").get_attribute("value") == service.key
    assert field_error(browser, "api_key") == ""

    spec = httpx.get(f"{service.url}/openapi.json", timeout=30).json()
    schema = spec["paths"]["/v1/videos"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    for name in ("steps", "guidance", "lora_alpha", "fps"):
        control = css(browser, f"#f-{name}")
        assert float(control.get_attribute("min")) == schema[name]["minimum"], name
        assert float(control.get_attribute("max")) == schema[name]["maximum"], name
        assert float(control.get_attribute("value")) == schema[name]["default"], name
    assert css(browser, "#f-negative_prompt").get_attribute("value") == schema["negative_prompt"]["default"]
    assert [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#f-v2v_mode option")] == \
        schema["v2v_mode"]["enum"]
    assert css(browser, "#f-frames").get_attribute("placeholder").startswith("17")  # the tiny preset's, from a plan
    frames, window = (schema[name]["anyOf"][0] for name in ("frames", "window_frames"))
    assert int(css(browser, "#f-frames").get_attribute("max")) == frames["maximum"] > 17  # beyond one window
    control = css(browser, "#f-window_frames")
    assert (int(control.get_attribute("min")), int(control.get_attribute("max"))) == (window["minimum"], window["maximum"])
    overlap = schema["extension_multipliers"]["anyOf"][0]["items"]
    assert [(float(e.get_attribute("min")), float(e.get_attribute("max")))
            for e in browser.find_elements(By.CSS_SELECTOR, ".ext-mult")] == [(overlap["minimum"], overlap["maximum"])] * 4
    # every field of the schema has a control (a field without one of its own gets a generic one)
    own = {"task", "images", "input_reference", "video", "positions", "multipliers", "width", "height"}
    missing = [name for name in schema if name not in own and not browser.find_elements(
        By.CSS_SELECTOR, f'#request-form [data-schema="{name}"]')]
    assert not missing, missing


def test_i2v_heatmap_progress_and_playback(browser, service, files):
    open_tab(browser, "i2v")
    set_value(browser, "#f-prompt", "The camera pans slowly")
    set_value(browser, "#f-steps", 3)
    set_value(browser, "#f-seed", 5)
    css(browser, "#f-images").send_keys(str(files.start))
    wait(browser, lambda d: css(d, '#strip .cell[data-latent="0"] .chip img'), 10, "the image on latent frame 0")
    cells = browser.find_elements(By.CSS_SELECTOR, "#strip .cell")
    assert [c.find_element(By.CSS_SELECTOR, ".pixel").text for c in cells] == ["px 0", "px 4", "px 8", "px 12", "px 16"]
    click_cell(browser, 2)  # place the image on latent frame 2
    wait(browser, lambda d: cell(d, 2).find_elements(By.CSS_SELECTOR, ".chip img"), 10, "the image on latent frame 2")
    assert "latent 2 = pixel frame 8" in css(browser, "#position-list").text
    wait(browser, lambda d: css(d, "#position-list input.mult").get_attribute("placeholder") == "0.2 (default)",
         20, "the plan's default multiplier shown")
    css(browser, "#f-positions_unit option[value='pixel']").click()  # sent as pixel frame 8

    rows = wait_plan(browser, "i2v", 3, lambda rows: rows[0][2] < rows[0][0])
    with open(files.start, "rb") as image:
        plan = httpx.post(f"{service.url}/v1/videos/plan", headers=service.headers, timeout=30,
                          files={"input_reference": ("start.png", image, "image/png")},
                          data={"prompt": "The camera pans slowly", "steps": "3", "positions": "2", "seed": "5"}).json()
    assert rows == [step["timesteps"] for step in plan["steps"]]
    assert plan["conditioning"] == [{"latent_index": 2, "multiplier": 0.2, "source": "image", "image_index": 0}]
    colours = js(browser, """const c = document.querySelector('#heatmap');
        const {cw, ch} = c._geometry; const g = c.getContext('2d');
        return [0, 2].map(f => Array.from(g.getImageData(52 + f * cw + cw / 2, 24 + ch / 2, 1, 1).data.slice(0, 3)));""")
    assert sum(colours[1]) < sum(colours[0])  # the conditioned frame's column is darker (less noise)

    job = submit_and_wait(browser, service)
    assert job["pusa"]["task"] == "i2v" and job["pusa"]["steps"] == 3 and job["pusa"]["seed"] == 5
    request = service.jobs.get(job["id"]).request
    assert request["positions"] == [8] and request["positions_unit"] == "pixel"  # latent (8 + 3) // 4 = 2
    css(browser, "#f-positions_unit option[value='latent']").click()  # latent indices from here on
    steps = [li.text for li in browser.find_elements(By.CSS_SELECTOR, '#job-log li[data-type="step"]')]
    assert [s.split(" (")[0] for s in steps] == ["step 1 of 3", "step 2 of 3", "step 3 of 3"]
    assert css(browser, "#job-step").text.startswith("step 3 of 3 · ETA 0.0 s · retries 0")
    assert css(browser, "#job-progress").get_attribute("value") == "100"
    assert plays(browser, job["id"]) > 0
    screenshot(browser, "i2v")


def test_extend_the_finished_video(browser, service):
    source = css(browser, "#result").get_attribute("data-video")
    set_value(browser, "#f-steps", 2)
    set_value(browser, "#extend-prompt", "and then it rains")
    css(browser, "#extend").click()
    wait(browser, lambda d: css(d, "#job-id").text != source, 30, "the extension's job")
    job = wait_job(browser, service)
    assert job["pusa"]["extended_from"] == source and job["pusa"]["task"] == "v2v" and job["prompt"] == "and then it rains"
    assert plays(browser, job["id"]) > 0


def test_cancel_a_job_while_its_steps_advance(browser, service):
    open_tab(browser, "t2v")
    set_value(browser, "#f-prompt", "A car drives through a city at night")
    set_value(browser, "#f-steps", 40)
    set_value(browser, "#f-size", "1024x1024")  # DiT steps of a few tenths of a second on a CPU
    set_value(browser, "#f-frames", 1)
    wait_plan(browser, "t2v", 40)
    before = css(browser, "#job-id").text
    css(browser, "#submit").click()
    wait(browser, lambda d: css(d, "#job-id").text != before, 30, "the job")
    first = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#job-log li[data-type="step"]'), 60, "a step")
    shown = css(browser, "#job-step").text
    wait(browser, lambda d: css(d, "#job-step").text != shown, 30, "the next step shown")  # live, from SSE
    assert first and " of 40 · ETA " in css(browser, "#job-step").text
    css(browser, "#cancel").click()
    job = wait_job(browser, service, "cancelled", 60)
    logged = [li.text for li in browser.find_elements(By.CSS_SELECTOR, '#job-log li[data-type="step"]')]
    assert 2 <= len(logged) < 40 and job["progress"] < 100
    assert css(browser, '#job-log li[data-type="cancelled"]').text.startswith("cancelled after step")
    assert css(browser, "#result").get_attribute("hidden") is not None and css(browser, "#cancel").get_attribute("disabled")
    set_value(browser, "#f-size", "")
    set_value(browser, "#f-frames", "")
    set_value(browser, "#f-steps", 2)
    wait_plan(browser, "t2v", 2)
    screenshot(browser, "t2v")


def test_multi_frames_two_images_at_chosen_positions(browser, service, files):
    open_tab(browser, "multi_frame")
    set_value(browser, "#f-prompt", "day to night")
    set_value(browser, "#f-steps", 2)
    css(browser, "#f-images").send_keys(f"{files.start}\n{files.end}")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#strip .chip img")) == 2, 10, "two images")
    assert cell(browser, 0).find_elements(By.CSS_SELECTOR, ".chip") and cell(browser, 4).find_elements(By.CSS_SELECTOR, ".chip")
    act(browser, lambda chain: chain.click(cell(browser, 0).find_element(By.CSS_SELECTOR, ".chip")))  # select image #1
    click_cell(browser, 1)  # ... and click latent frame 1 to place it
    wait(browser, lambda d: cell(d, 1).find_elements(By.CSS_SELECTOR, ".chip"), 10, "image #1 on latent frame 1")
    wait_plan(browser, "multi_frame", 2, lambda rows: rows[0][1] < 1000 and rows[0][4] < 1000)
    act(browser, lambda chain: chain.click_and_hold(cell(browser, 4).find_element(By.CSS_SELECTOR, ".chip"))
        .move_by_offset(-20, 0).move_to_element(cell(browser, 3)).release())  # drag image #2 from latent frame 4 to 3
    wait(browser, lambda d: cell(d, 3).find_elements(By.CSS_SELECTOR, ".chip"), 10, "image #2 on latent frame 3")
    listed = css(browser, "#position-list").text
    assert "latent 1 = pixel frame 4" in listed and "latent 3 = pixel frame 12" in listed

    # a 400 next to its field: one multiplier for two positions (a rule only the API knows)
    multipliers = browser.find_elements(By.CSS_SELECTOR, "#position-list input.mult")
    multipliers[1].send_keys("0.6")
    wait(browser, lambda d: "1 multipliers for 2 positions" in field_error(d, "multipliers"), 20, "the 400 at multipliers")
    assert "invalid" in css(browser, '.field[data-param="multipliers"]').get_attribute("class")
    multipliers[0].send_keys("0.1")  # the same inputs: a new plan does not rebuild them under the cursor
    wait(browser, lambda d: field_error(d, "multipliers") == "", 20, "the error cleared")
    rows = wait_plan(browser, "multi_frame", 2, lambda rows: rows[0][1] == 100.0 and rows[0][3] == 600.0)
    assert rows[0][0] == rows[0][2] == rows[0][4] == 1000.0
    screenshot(browser, "multi_frame")

    job = submit_and_wait(browser, service)
    request = service.jobs.get(job["id"]).request
    assert request["task"] == "multi_frame" and request["positions"] == [1, 3] and request["multipliers"] == [0.1, 0.6]
    assert len(request["images"]) == 2 and plays(browser, job["id"]) > 0


def test_a_400_is_shown_next_to_its_field_then_t2v(browser, service):
    open_tab(browser, "t2v")
    set_value(browser, "#f-prompt", "waves")
    set_value(browser, "#f-size", "50x64")
    wait(browser, lambda d: "multiples of 16" in field_error(d, "size"), 20, "the 400 at size")
    before = css(browser, "#job-id").text
    css(browser, "#submit").click()  # refused: no job, the error stays by the field
    time.sleep(0.5)
    wait(browser, lambda d: not css(d, "#submit").get_attribute("disabled"), 10, "the submit to return")
    assert "multiples of 16" in field_error(browser, "size") and css(browser, "#job-id").text == before
    assert field_error(browser, "request") == ""
    set_value(browser, "#f-size", "")
    wait(browser, lambda d: field_error(d, "size") == "", 20, "the error cleared")
    job = submit_and_wait(browser, service)  # and then a text-to-video job goes through
    assert job["pusa"]["task"] == "t2v" and job["pusa"]["steps"] == 2 and plays(browser, job["id"]) > 0


def test_video_to_video_from_the_gallery_and_its_pages(browser, service):
    css(browser, "#gallery-refresh").click()
    ids = wait(browser, lambda d: len(gallery(d)) == 5 and gallery(d), 20, "five videos")
    listed = httpx.get(f"{service.url}/v1/videos", params={"limit": 8}, headers=service.headers, timeout=30).json()
    assert ids == [v["id"] for v in listed["data"]]  # newest first: t2v, multi, cancelled t2v, extension, i2v
    wait(browser, lambda d: js(d, "return [...document.querySelectorAll('#gallery-list .card[data-status=completed] img')]"
                                  ".every(i => i.complete && i.naturalWidth > 0)"), 20, "the thumbnails")
    source = ids[-1]  # the i2v video
    card = css(browser, f'#gallery-list .card[data-id="{source}"]')
    card.find_element(By.XPATH, ".//button[text()='Use as v2v input']").click()
    wait(browser, lambda d: css(d, "#tab-v2v").get_attribute("aria-selected") == "true", 10, "the v2v tab")
    assert css(browser, "#f-video-id").get_attribute("value") == source
    set_value(browser, "#f-prompt", "the same street in the rain")
    set_value(browser, "#f-steps", 2)
    for latent in (0, 2):
        click_cell(browser, latent)
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#position-list li")) == 2, 10, "two kept frames")
    wait_plan(browser, "v2v", 2, lambda rows: rows[0][0] == rows[0][2] == 300.0 and rows[0][1] == 1000.0)
    screenshot(browser, "v2v")
    job = submit_and_wait(browser, service)
    request = service.jobs.get(job["id"]).request
    assert request["task"] == "v2v" and request["positions"] == [0, 2] and plays(browser, job["id"]) > 0

    # pages of four: six videos now, so a second page with the two oldest, and back
    select = css(browser, "#gallery-limit")
    select.find_element(By.CSS_SELECTOR, "option[value='4']").click()
    wait(browser, lambda d: gallery(d)[:1] == [job["id"]] and len(gallery(d)) == 4
         and not css(d, "#gallery-older").get_attribute("disabled"), 20, "the first page")
    css(browser, "#gallery-older").click()
    wait(browser, lambda d: gallery(d) == ids[3:], 20, "the second page")
    assert css(browser, "#gallery-older").get_attribute("disabled")
    css(browser, "#gallery-newer").click()
    wait(browser, lambda d: gallery(d) == [job["id"], *ids[:3]], 20, "the first page again")


def test_a_long_video_window_by_window(browser, service):
    open_tab(browser, "t2v")
    set_value(browser, "#f-prompt", "a train crosses a bridge")
    set_value(browser, "#f-steps", 2)
    set_value(browser, "#f-frames", 25)
    windows = lambda d: css(d, "#plan-windows").get_attribute("data-windows")  # noqa: E731
    wait(browser, lambda d: windows(d) == "1", 20, "one window (81 frames by default)")
    set_value(browser, "#f-window_frames", 17)  # windows of 17 frames: 17, then 4 and 4 new ones
    wait(browser, lambda d: windows(d) == "3", 20, "three windows planned")
    assert [w.text for w in browser.find_elements(By.CSS_SELECTOR, "#plan-windows .window")] == \
        ["window 1: 17 frames", "2: +4", "3: +4"]
    assert "25 frames in 3 windows of 17" in css(browser, "#plan-summary").text
    overlap = browser.find_elements(By.CSS_SELECTOR, ".ext-mult")
    assert [e.get_attribute("placeholder") for e in overlap] == ["0", "0.3", "0.4", "0.5"]  # the plan's defaults
    set_value(browser, "#f-window_frames", 21)
    wait(browser, lambda d: windows(d) == "2", 20, "two windows of 21 frames")
    set_value(browser, "#f-window_frames", 17)
    wait(browser, lambda d: windows(d) == "3", 20, "three windows again")
    overlap[1].send_keys("0.6")  # the others at their defaults

    job = submit_and_wait(browser, service, timeout=120)
    request = service.jobs.get(job["id"]).request
    assert job["pusa"]["frames"] == 25 and request["extension_multipliers"] == [0, 0.6, 0.4, 0.5]
    steps = [li.text.split(" (")[0] for li in browser.find_elements(By.CSS_SELECTOR, '#job-log li[data-type="step"]')]
    assert steps == [f"window {k // 2 + 1} of 3 · step {k + 1} of 6" for k in range(6)]
    assert css(browser, "#job-step").text.startswith("window 3 of 3 · step 6 of 6 · ETA")
    wait(browser, lambda d: js(d, "return [...document.querySelectorAll('#job-windows video')].filter(v => v.readyState >= 1"
                                  " && v.duration > 0 && v.src.startsWith('blob:')).length") == 3, 20, "three window videos")
    entries = browser.find_elements(By.CSS_SELECTOR, "#job-windows li")
    assert [e.find_element(By.TAG_NAME, "span").text for e in entries] == \
        [f"window {i} of 3 · 17 frames" for i in (1, 2, 3)]
    longest_window = max(js(browser, "return [...document.querySelectorAll('#job-windows video')].map(v => v.duration)"))
    assert plays(browser, job["id"]) > longest_window  # the stitched video, longer than any window


def test_fast_mode_and_the_lora_picker(browser, service):
    open_tab(browser, "t2v")
    set_value(browser, "#f-frames", "")
    set_value(browser, "#f-steps", 3)
    wait_plan(browser, "t2v", 3)
    assert css(browser, "#lora-box").is_displayed()
    assert css(browser, '.field[data-param="mode"] .hint').text.endswith("the fast LoRA here: distill")
    css(browser, "#f-mode").click()
    wait_plan(browser, "t2v", 4)  # fast: the API's 4 steps at guidance 1, with the registry's fast LoRA
    assert css(browser, "#f-steps").get_attribute("value") == "" and css(browser, "#f-guidance").get_attribute("value") == ""
    assert css(browser, "#f-steps").get_attribute("placeholder") == "4 (fast mode)"
    wait(browser, lambda d: "4 steps × 1 passes, fast, LoRAs distill 1," in css(d, "#plan-summary").text, 20, "fast's plan")

    css(browser, "#add-lora").click()
    css(browser, "#add-lora").click()  # the first registry name not chosen yet: distill, then style
    selects = browser.find_elements(By.CSS_SELECTOR, "#lora-list select")
    assert [s.get_attribute("value") for s in selects] == ["distill", "style"]
    assert [o.text for o in selects[0].find_elements(By.TAG_NAME, "option")] == ["distill (fast)", "style"]
    alphas = browser.find_elements(By.CSS_SELECTOR, "#lora-list input.alpha")
    assert [a.get_attribute("placeholder") for a in alphas] == ["1 (default)", "0.5 (default)"]
    alphas[1].send_keys("0.7")
    wait(browser, lambda d: "LoRAs distill 1, style 0.7," in css(d, "#plan-summary").text, 20, "both LoRAs planned")
    selects[1].find_element(By.CSS_SELECTOR, "option[value='distill']").click()  # distill twice: a 400 by the picker
    wait(browser, lambda d: "listed twice" in field_error(d, "loras"), 20, "the 400 at loras")
    assert "invalid" in css(browser, '.field[data-param="loras"]').get_attribute("class")
    browser.find_elements(By.CSS_SELECTOR, "#lora-list li button")[1].click()
    wait(browser, lambda d: field_error(d, "loras") == "", 20, "the error cleared")

    job = submit_and_wait(browser, service)
    request = service.jobs.get(job["id"]).request
    assert request["mode"] == "fast" and request["steps"] == 4 and request["guidance"] == 1.0
    assert request["loras"] == [{"name": "distill", "alpha": 1.0}] and plays(browser, job["id"]) > 0
    css(browser, "#f-mode").click()  # off: steps and guidance come back
    assert css(browser, "#f-steps").get_attribute("value") == "3"
    wait_plan(browser, "t2v", 3)


def test_v1_loras_lists_the_registry_without_its_files(service):
    listed = httpx.get(f"{service.url}/v1/loras", headers=service.headers, timeout=30)
    assert listed.status_code == 200 and listed.json() == {"object": "list", "data": [
        {"object": "lora", "name": "distill", "alpha": 1.0, "fast": True},
        {"object": "lora", "name": "style", "alpha": 0.5, "fast": False}]}
    assert httpx.get(f"{service.url}/v1/loras", timeout=30).status_code == 401
    spec = httpx.get(f"{service.url}/openapi.json", timeout=30).json()["paths"]["/v1/loras"]["get"]
    ok = spec["responses"]["200"]["content"]["application/json"]["schema"]
    assert "401" in spec["responses"] and ok.get("$ref", "").endswith("/LoraList")


def test_the_plan_is_checked_as_a_create_and_makes_no_job(service):
    before = httpx.get(f"{service.url}/v1/videos", params={"limit": 100}, headers=service.headers, timeout=30).json()
    costly = {"prompt": "waves", "size": "1920x1920", "frames": 241, "steps": 50}  # over max_gpu_seconds
    bad_image = {"files": {"input_reference": ("x.png", b"not an image", "image/png")}, "data": {"prompt": "waves"}}
    for request in ({"json": costly}, bad_image, {"json": {"prompt": "waves", "positions": [0], "task": "t2v"}}):
        plan = httpx.post(f"{service.url}/v1/videos/plan", headers=service.headers, timeout=30, **request)
        create = httpx.post(f"{service.url}/v1/videos", headers=service.headers, timeout=30, **request)
        assert plan.status_code == create.status_code == 400, (plan.text, create.text)
        refusal, created = plan.json()["error"], create.json()["error"]
        assert refusal["param"] and refusal["param"] == created["param"], (refusal, created)
        assert refusal["message"].split("<")[0] == created["message"].split("<")[0]  # less an object's address
    plan = httpx.post(f"{service.url}/v1/videos/plan", headers=service.headers, timeout=30, json={"prompt": "waves", "steps": 2})
    assert plan.status_code == 200 and plan.json()["object"] == "video.plan" and len(plan.json()["steps"]) == 2
    after = httpx.get(f"{service.url}/v1/videos", params={"limit": 100}, headers=service.headers, timeout=30).json()
    assert after["data"] == before["data"]
    assert httpx.post(f"{service.url}/v1/videos/plan", json={"prompt": "waves"}, timeout=30).status_code == 401
