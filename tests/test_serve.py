"""`lcm serve`: the batcher, request validation, the HTTP/JSON API and health endpoint, and the gradio page in a
real headless Chromium -- every bad request answered with one clear line while the server keeps serving."""
import base64
import io
import json
import math
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from latentcm import registry
from latentcm.bundle import Bundle
from latentcm.serve.app import DEFAULT_HOST, error_status, serve_in_thread
from latentcm.serve.batcher import Batcher, Busy, Stopped
from latentcm.serve.service import ServeConfig, Service
from latentcm.serve.validate import BadRequest, Limits, parse_request

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a large red circle on a blue background"
MAX_QUEUE = 6


# --- the batcher, without models ---------------------------------------------------------------------

class Recorder:
    """A run_batch that records (key, items) and can be held inside a batch."""

    def __init__(self, fail_on=None):
        self.batches, self.gate, self.fail_on = [], threading.Event(), fail_on
        self.gate.set()
        self.inside = threading.Event()

    def __call__(self, key, items):
        self.inside.set()
        self.gate.wait(10)
        self.batches.append((key, list(items)))
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [f"{key}:{item}" for item in items]


def test_batcher_groups_equal_keys_up_to_max_batch_and_answers_everyone():
    rec = Recorder()
    batcher = Batcher(rec, max_batch=4, window_s=0.05, max_queue=32)
    with batcher._cond:  # submit atomically: the worker sees all of them at once
        jobs = [batcher.submit("a" if i % 3 else "b", i) for i in range(9)]
    results = [job.future.result(10) for job in jobs]
    batcher.stop()
    assert results == [f"{'a' if i % 3 else 'b'}:{i}" for i in range(9)]
    assert [(k, items) for k, items in rec.batches] == [("b", [0, 3, 6]), ("a", [1, 2, 4, 5]), ("a", [7, 8])]
    assert all(job.batch_size == len(next(i for k, i in rec.batches if job.item in i)) for job in jobs)
    assert batcher.stats["completed"] == 9 and batcher.stats["largest_batch"] == 4


def test_batcher_sizes_count_images_and_batching_off_runs_each_job_alone():
    rec = Recorder()
    batcher = Batcher(rec, max_batch=4, window_s=0.05)
    with batcher._cond:
        jobs = [batcher.submit("k", i, size=3 if i == 0 else 1) for i in range(4)]
    [job.future.result(10) for job in jobs]
    batcher.stop()
    assert [items for _, items in rec.batches] == [[0, 1], [2, 3]]  # 3 + 1 images, then 1 + 1
    rec = Recorder()
    off = Batcher(rec, max_batch=1, window_s=0.05)
    with off._cond:
        jobs = [off.submit("k", i) for i in range(3)]
    [job.future.result(10) for job in jobs]
    off.stop()
    assert [items for _, items in rec.batches] == [[0], [1], [2]] and not off.batching


def test_full_queue_raises_busy_and_nothing_is_dropped():
    rec = Recorder()
    rec.gate.clear()
    batcher = Batcher(rec, max_batch=1, window_s=0.0, max_queue=2)
    first = batcher.submit("k", 0)
    assert rec.inside.wait(5)  # the worker holds job 0
    queued = [batcher.submit("k", i) for i in (1, 2)]
    with pytest.raises(Busy, match="busy"):
        batcher.submit("k", 3)
    rec.gate.set()
    assert [j.future.result(10) for j in [first, *queued]] == ["k:0", "k:1", "k:2"]
    assert batcher.stats["rejected_busy"] == 1 and batcher.stats["completed"] == 3
    batcher.stop()


def test_a_failing_batch_fails_its_jobs_only_and_stop_fails_the_waiting():
    rec = Recorder(fail_on=1)
    batcher = Batcher(rec, max_batch=2, window_s=0.05)
    with batcher._cond:
        bad = [batcher.submit("k", i) for i in (0, 1)]
    for job in bad:
        with pytest.raises(ValueError, match="bad item 1"):
            job.future.result(10)
    assert batcher.submit("k", 5).future.result(10) == "k:5"  # the worker carries on
    rec.gate.clear()
    rec.inside.clear()
    running = batcher.submit("j", 6)
    assert rec.inside.wait(5)
    waiting = batcher.submit("m", 7)
    threading.Timer(0.2, rec.gate.set).start()
    batcher.stop()
    assert running.future.result(10) == "j:6"
    with pytest.raises(Stopped):
        waiting.future.result(10)
    with pytest.raises(Stopped):
        batcher.submit("j", 8)


# --- validation --------------------------------------------------------------------------------------

def test_validation_bounds_and_defaults():
    limits = Limits()
    req = parse_request({"prompt": PROMPT}, limits)
    assert (req.model, req.steps, req.guidance, req.gamma, req.num_images, req.height) == ("lcm", 4, 8.5, None, 1, 64)
    assert parse_request({"prompt": PROMPT, "model": "teacher"}, limits).guidance == 7.5
    for payload, needle in [
        ({"prompt": "a", "num_images": 5}, "num_images must be in 1..4"),
        ({"prompt": "a", "height": 48 + 8}, "multiple of 16"), ({"prompt": "a", "width": 4096}, "width must be in"),
        ({"prompt": "a", "gamma": 1.5}, "gamma must be in"), ({"prompt": "a", "gamma": "x"}, "must be a number"),
        ({"prompt": "a", "model": "teacher", "gamma": 0.3}, "needs an LCM"),
        ({"prompt": "a", "steps": 2.5}, "integer"), ({"prompt": "a", "steps": True}, "must be a number"),
        ({"prompt": "a", "seed": -1}, "seed must be in"), ({"prompt": "a", "model": "../lcm"}, "model must be one of"),
        ({"prompt": "a", "path": "/etc/passwd"}, "unknown field 'path'"), ({"prompt": "a", "strength": 0.5}, "needs"),
        ({"prompt": "a", "guidance": float("inf")}, "finite"),
        ({"prompt": ["a"]}, "prompt must be a string, got an array"),
        ({"prompt": "a\x00b"}, "control characters"),
    ]:
        with pytest.raises(BadRequest, match=needle.replace("(", r"\(").replace(".", r"\.")):
            parse_request(payload, limits)
    with pytest.raises(BadRequest, match="JSON object"):
        parse_request(["prompt"], limits)


# --- the service and the HTTP API ---------------------------------------------------------------------

def _png(image: np.ndarray | None = None, size=(48, 40)) -> str:
    if image is None:
        image = np.zeros((size[1], size[0], 3), np.uint8)
        image[:, : size[0] // 2] = (220, 30, 30)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A registered LoRA for the shipped teacher: rank 2, random B (so it changes the UNet), diffusers keys."""
    from latentcm.bundle import Bundle
    from latentcm.models.lora import ADAPTER, LoRAConfig, add_lora, save_diffusers_lora

    unet = Bundle.load(registry.resolve("teacher")).unet
    add_lora(unet, LoRAConfig(rank=2, seed=0))
    torch.manual_seed(0)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    dest = tmp_path_factory.mktemp("lora") / "tiny-lora"
    save_diffusers_lora(unet, dest, ADAPTER)
    return dest


@pytest.fixture(scope="module")
def service(lora_dir):
    svc = Service(ServeConfig(loras={"tiny": str(lora_dir)}, max_batch=8, window_ms=30, max_queue=MAX_QUEUE,
                              warmup=False))
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def server(service):
    running = serve_in_thread(service)  # the default host: 127.0.0.1
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def test_default_bind_is_loopback(server):
    from latentcm.cli import cli

    assert DEFAULT_HOST == "127.0.0.1" and server.host == "127.0.0.1"
    assert {p.name: p.default for p in cli.commands["serve"].params}["host"] == "127.0.0.1"


def test_health(client, service):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["models"] == ["lcm", "teacher"] and health["loras"] == ["tiny"]
    assert health["max_queue"] == MAX_QUEUE and health["batching"] and health["limits"]["max_lcm_steps"] == 8


def test_generate_returns_pngs_and_timings(client):
    r = client.post("/api/generate", json={"prompt": PROMPT, "num_images": 2, "seed": 3, "steps": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "lcm" and body["seeds"] == [3, 4] and len(body["images"]) == 2
    assert _pixels(body["images"][0]).shape == (64, 64, 3)
    assert {"run_s", "queue_s", "batch_images", "per_image_s"} <= body["timings"].keys()
    teacher = client.post("/api/generate", json={"prompt": PROMPT, "model": "teacher", "steps": 2})
    assert teacher.status_code == 200 and teacher.json()["model"] == "teacher"
    tcd = client.post("/api/generate", json={"prompt": PROMPT, "steps": 2, "gamma": 0.3, "height": 48, "width": 80})
    assert tcd.status_code == 200 and _pixels(tcd.json()["images"][0]).shape == (48, 80, 3)


def test_batched_images_equal_solo_images(service):
    """Three compatible requests run as one UNet batch; each gets the images of its own solo run."""
    reqs = [parse_request({"prompt": p, "seed": s, "num_images": n, "steps": 2}, service.limits)
            for p, s, n in [(PROMPT, 0, 2), ("a small green star on a white background", 10, 1),
                            ("a blue square", 20, 3)]]
    with service.batcher._cond:
        jobs = [service.submit(r) for r in reqs]
    batched = [job.future.result(120) for job in jobs]
    assert [b.timings["batch_images"] for b in batched] == [6, 6, 6]
    assert [b.timings["batch_requests"] for b in batched] == [3, 3, 3]
    for req, res in zip(reqs, batched):
        solo = service.generate(req, 120)
        assert solo.timings["batch_images"] == req.num_images
        for a, b in zip(res.images, solo.images):
            # per-image seeds: equal up to the float rounding of batched matmuls (atol 1e-5 on [-1, 1])
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
            assert (a == b).mean() > 0.99


BAD = {
    "empty prompt": ({"prompt": "   "}, 400, "prompt is empty"),
    "10 kB prompt": ({"prompt": "a red circle " * 800}, 400, "at most 500"),
    "steps 0": ({"prompt": PROMPT, "steps": 0}, 400, "steps must be in 1..8, got 0"),
    "steps 99": ({"prompt": PROMPT, "steps": 99}, 400, "steps must be in 1..8, got 99"),
    "guidance NaN": ('{"prompt": "a red circle", "guidance": NaN}', 400, "guidance must be a finite number"),
    "50 MB upload": (None, 413, "larger than"),
    "non-image upload": ({"prompt": PROMPT, "init_image": base64.b64encode(b"%PDF-1.4 not an image").decode()},
                         400, "not a readable image"),
    "not base64": ({"prompt": PROMPT, "init_image": "***"}, 400, "not valid base64"),
    "path as LoRA name": ({"prompt": PROMPT, "loras": [{"name": "../../etc/passwd"}]}, 400, "never by path"),
    "absolute LoRA path": ({"prompt": PROMPT, "loras": [{"name": "/tmp/x.safetensors", "weight": 1}]}, 400,
                           "unknown LoRA"),
    "not JSON": ("{prompt", 400, "not valid JSON"),
    "unknown field": ({"prompt": PROMPT, "model_dir": "/etc"}, 400, "unknown field"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_gets_one_clear_error_and_the_server_keeps_serving(client, case):
    payload, status, needle = BAD[case]
    if case == "50 MB upload":  # 50 MB of image bytes, base64 in the JSON body
        content = json.dumps({"prompt": PROMPT, "init_image": "A" * (50 * 2**20 * 4 // 3)}).encode()
    else:
        content = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
    r = client.post("/api/generate", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    message = r.json()["error"]
    assert needle in message and "\n" not in message and "Traceback" not in message
    assert client.get("/health").json()["status"] == "ok"


def test_server_still_generates_after_the_bad_requests(client):
    assert client.post("/api/generate", json={"prompt": PROMPT, "steps": 1}).status_code == 200


def test_img2img_upload(client):
    r = client.post("/api/generate", json={"prompt": "a large blue circle", "init_image": _png(), "strength": 0.6,
                                           "steps": 2, "num_images": 2})
    assert r.status_code == 200, r.text
    images = [_pixels(b) for b in r.json()["images"]]
    assert images[0].shape == (64, 64, 3) and not np.array_equal(images[0], images[1])
    data_url = "data:image/png;base64," + _png()
    assert client.post("/api/generate", json={"prompt": "a red circle", "init_image": data_url, "steps": 1,
                                              "strength": 0.5}).status_code == 200
    r = client.post("/api/generate", json={"prompt": "a", "init_image": _png(), "strength": 0.05, "steps": 4})
    kept = int(Bundle.load(registry.resolve("lcm")).original_inference_steps * 0.05)  # of the shipped LCM's grid
    assert r.status_code == 400 and f"keeps {kept} points" in r.json()["error"]


def test_lora_by_registered_name_only(client, service):
    r = client.post("/api/generate", json={"prompt": PROMPT, "steps": 2, "loras": [{"name": "tiny", "weight": 0.8}]})
    assert r.status_code == 200, r.text and r.json()["model"] == "teacher+tiny:0.8"
    plain = client.post("/api/generate", json={"prompt": PROMPT, "steps": 2}).json()["images"][0]
    assert not np.array_equal(_pixels(plain), _pixels(r.json()["images"][0]))
    r = client.post("/api/generate", json={"prompt": PROMPT, "loras": ["tiny"], "guidance": 5})
    assert r.status_code == 400 and "distilled in" in r.json()["error"]
    for name in ("tiny.safetensors", str(service.lora_files["tiny"]), "Tiny"):
        r = client.post("/api/generate", json={"prompt": PROMPT, "loras": [{"name": name}]})
        assert r.status_code == 400 and "unknown LoRA" in r.json()["error"]


def test_full_queue_answers_429_and_every_request_is_answered(client, service):
    """The worker is held inside a batch; MAX_QUEUE requests wait; the rest are refused with 429 at once."""
    service._lock.acquire()
    try:
        with ThreadPoolExecutor(MAX_QUEUE + 4) as pool:
            first = pool.submit(client.post, "/api/generate", json={"prompt": PROMPT, "steps": 1})
            deadline = time.monotonic() + 30
            while service.batcher.pending() or service.batcher.stats["submitted"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.1)  # past the batching window: the worker is now blocked in the batch
            waiting = [pool.submit(client.post, "/api/generate", json={"prompt": PROMPT, "steps": 1, "seed": i})
                       for i in range(MAX_QUEUE)]
            while service.batcher.pending() < MAX_QUEUE:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            refused = [client.post("/api/generate", json={"prompt": PROMPT, "steps": 1}) for _ in range(3)]
            assert [r.status_code for r in refused] == [429] * 3
            assert all("busy" in r.json()["error"] and r.headers["retry-after"] == "1" for r in refused)
            assert client.get("/health").json()["queue"] == MAX_QUEUE  # health answers while busy
            service._lock.release()
            answered = [f.result(120) for f in [first, *waiting]]
    finally:
        if service._lock.locked():
            service._lock.release()
    assert [r.status_code for r in answered] == [200] * (MAX_QUEUE + 1)


def test_error_statuses():
    assert error_status(BadRequest("x", 413)) == (413, "x") and error_status(Busy("busy"))[0] == 429
    assert error_status(Stopped("s"))[0] == 503 and error_status(KeyError("k"))[0] == 500


# --- a real browser -----------------------------------------------------------------------------------

def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    assert browser and driver, ("the browser test needs Debian's chromium and chromium-driver "
                                "(apt-get install -y chromium chromium-driver; .ci/run installs them)")
    return browser, driver


def test_browser_types_a_prompt_presses_generate_and_an_image_appears(server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1100", f"--user-data-dir={tmp_path / 'profile'}",
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=DriverService(executable_path=driver_path), options=opts)
    try:
        driver.set_page_load_timeout(60)
        driver.get(server.url)
        wait = WebDriverWait(driver, 60)
        box = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
        box.send_keys(PROMPT)
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        image = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "#lcm-gallery img")))
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
        assert image.get_attribute("naturalWidth") == "64"
        wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "#teacher-gallery img")))
        wait.until(lambda d: "ms/image" in d.find_element(By.CSS_SELECTOR, "#timings").text)
        shot = tmp_path / "browser.png"
        driver.save_screenshot(str(shot))
        assert Image.open(shot).size[0] > 0
        if os.environ.get("LATENTCM_SCREENSHOT"):
            shutil.copy(shot, os.environ["LATENTCM_SCREENSHOT"])
        # the page loaded nothing from outside this server (no fonts, scripts or analytics)
        urls = [json.loads(e["message"])["message"].get("params", {}).get("request", {}).get("url", "")
                for e in driver.get_log("performance")]
        outside = [u for u in urls if u.startswith(("http:", "https:", "ws:", "wss:")) and not u.startswith(server.url)]
        assert any(u.startswith(server.url) for u in urls)
        assert not outside, outside[:5]
    finally:
        driver.quit()


def test_ui_errors_show_in_the_page_not_a_crash(server, service):
    """The UI path validates like the API: its handler turns a bad input into a gradio error message."""
    import gradio as gr

    from latentcm.serve.app import MODEL_DEFAULT, build_ui

    demo = build_ui(service)
    fn = next(f for f in demo.fns.values() if f.api_name == "generate").fn
    with pytest.raises(gr.Error, match="prompt is empty"):
        fn("", 4, 8.5, 0, 1, 64, 64, False, 0.3, MODEL_DEFAULT, None, 0.5, False, 25, 0.0)
    big = Image.new("RGB", (5000, 5000))
    with pytest.raises(gr.Error, match="pixels"):
        fn(PROMPT, 2, 8.5, 0, 1, 64, 64, False, 0.3, MODEL_DEFAULT, big, 0.5, False, 25, 0.0)
    with pytest.raises(gr.Error, match="TCD sampling"):  # keep-means is Algorithm 3's, not TCD's
        fn(PROMPT, 2, 8.5, 0, 1, 64, 64, True, 0.3, "keep-means", None, 0.5, False, 25, 0.0)
    lcm_images, teacher_images, text = fn(PROMPT, 2, 8.5, 0, 1, 64, 64, True, 0.3, MODEL_DEFAULT, None, 0.5, True, 2,
                                          0.0)
    assert len(lcm_images) == 1 and len(teacher_images) == 1 and "Teacher DDIM" in text and math.isfinite(
        lcm_images[0].mean())
    fresh, _, _ = fn(PROMPT, 2, 8.5, 0, 1, 64, 64, False, 0.3, "fresh", None, 0.5, False, 2, 0.0)
    kept, _, _ = fn(PROMPT, 2, 8.5, 0, 1, 64, 64, False, 0.3, "keep-means", None, 0.5, False, 2, 0.0)
    assert np.abs(np.asarray(fresh[0], dtype=float) - np.asarray(kept[0], dtype=float)).max() > 0  # it reaches the sampler
