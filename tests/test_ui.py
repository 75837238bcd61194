"""The Gradio app: its work functions against independent recomputation, bad input as messages, ten
concurrent compare requests in queue order, and a real headless Chromium driving every tab.

The browser tests need Playwright and Chromium (`.ci/run` installs Debian's `chromium`); where they
are missing they skip, unless DIT_ACCEL_REQUIRE_BROWSER=1 (CI) makes that a failure. Screenshots go
to $DIT_ACCEL_ARTIFACTS (default: artifacts/ui)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gradio")

from dit_accel.evals import metrics  # noqa: E402
from dit_accel.pipelines import load_reference  # noqa: E402
from dit_accel.ui.core import MAX_STEPS, Stopped, Studio, UIError  # noqa: E402
from dit_accel.ui.screenshots import CHROMIUM_ARGS  # noqa: E402

TINY = dict(steps=2, num_frames=5, height=16, width=16)
PROMPT = "a red circle moving right on a dark blue background"


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    pipe = load_reference(device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return Studio(pipe=pipe, workdir=tmp_path_factory.mktemp("ui"), runs_dir=tmp_path_factory.mktemp("runs"))


def _gif_frames(path):
    from PIL import Image, ImageSequence

    return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(Image.open(path))])


def test_compare_runs_both_on_one_seed_and_reports_metrics(studio):
    res = studio.compare(PROMPT, "", 3, 2, 9, 32, 32, 4.0, "Neighborhood",
                          '{"window": [0.3, 0.3, 0.3], "estimate": false}')
    row = res["row"]
    # both outputs are the pipeline's own generations on the same seed: recompute them here
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    stock = studio.pipe(prompt=PROMPT, generator=gen(), output_type="np", num_inference_steps=2, num_frames=9,
                        height=32, width=32, guidance_scale=4.0).frames[0]
    base = _gif_frames(res["baseline"])
    scale = base.shape[1] // 32
    assert np.array_equal(base[:, ::scale, ::scale], np.round(np.clip(stock, 0, 1) * 255).astype(np.uint8))
    accel = _gif_frames(res["accelerated"])[:, ::scale, ::scale] / 255.0
    assert row["psnr"] == pytest.approx(min(metrics.psnr(accel, base[:, ::scale, ::scale] / 255.0), 99), abs=0.01)
    # the VBench-style dimensions of the accelerated video, as the eval runner computes them
    assert row["vbench_temporal_flickering"] == pytest.approx(metrics.temporal_flickering(accel), abs=1e-5)
    assert row["vbench_motion_smoothness"] == pytest.approx(metrics.motion_smoothness(accel), abs=1e-5)
    assert row["vbench_dynamic_degree"] == metrics.dynamic_degree(accel)["dynamic"]
    assert row["vbench_subject_consistency"] == row["vbench_background_consistency"]
    assert 0 < row["density"] < 1
    assert row["speedup"] == pytest.approx(row["baseline_s"] / row["accelerated_s"], rel=0.01, abs=2e-3)
    assert studio.history[-1] is row and row["checker_baseline"] is not None
    exported = json.loads(studio.export("json").read_text())
    assert exported[-1]["run"] == row["run"]
    assert studio.export("csv").read_text().splitlines()[0].startswith("run,prompt,seed,method")


@pytest.mark.parametrize("change,message", [
    ({"steps": 0}, "steps: must be a whole number from 1"),
    ({"height": "abc"}, "height: expected a whole number"),
    ({"parameters": "{window: 1}"}, "parameters: not valid JSON"),
    ({"parameters": '{"windw": [1, 1, 1]}'}, "parameters.windw: Neighborhood has no parameter"),
    ({"method": "Sparse9000"}, "parameters.method: unknown method"),
    ({"heads": "0-1"}, "heads: '0-1' is not LAYER.HEAD"),
    ({"heads": "40.0"}, "layer 40"),
    ({"prompt": " "}, "prompt: must not be empty"),
])
def test_bad_input_is_a_message_naming_the_field(studio, change, message):
    args = dict(prompt=PROMPT, negative_prompt="", seed=0, guidance_scale=4.0, method="Neighborhood", parameters="{}",
                heads="", **TINY)
    args.update(change)
    with pytest.raises(UIError, match=re.escape(message)):
        studio.compare(**args)


def test_presets_round_trip_and_guided_differs(studio, tmp_path):
    path = studio.save_preset(tmp_path / "p.json", ["0.1", "5.2"], 0.8, 2.0, {"layers": [0], "values": [[0.1]]})
    data = studio.load_preset(path)
    assert data["heads"] == ["0.1", "5.2"] and (data["strength"], data["scale"]) == (0.8, 2.0)
    from dit_accel import SoftPAG

    assert SoftPAG(preset=path).heads == {0: (1,), 5: (2,)}
    res = studio.guided(PROMPT, 0, guidance_scale=1.0, heads=["0.1", "5.2"], strength=0.8, scale=2.0, **TINY)
    assert res["max_abs_diff"] > 0
    with pytest.raises(UIError, match="heads: select at least one head"):
        studio.guided(PROMPT, 0, heads=[], **TINY)
    with pytest.raises(UIError, match="preset path: no such file"):
        studio.load_preset(tmp_path / "missing.json")


def _processor_types(pipe):
    return {name: type(p) for name, p in pipe.transformer.attn_processors.items()}


def _wait(condition, what: str, timeout: float = 120):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_stop_ends_a_running_compare_and_keeps_nothing(studio):
    pipe = studio.pipe
    stock = _processor_types(pipe)
    history, folders = len(studio.history), sorted(studio.workdir.iterdir())
    calls = []
    counter = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    outcome = {}

    def run():  # 100 steps each for the baseline and the accelerated pass: far longer than the test waits
        try:
            outcome["result"] = studio.compare(PROMPT, "", 0, MAX_STEPS, 9, 32, 32, 4.0, "Dense", "{}")
        except Exception as exc:  # noqa: BLE001 (the test inspects it)
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    try:
        worker.start()
        # stop it in its accelerated pass, with the method's processors on the model
        _wait(lambda: _processor_types(pipe) != stock or not worker.is_alive(), "the accelerated pass")
        baseline_calls = len(calls)  # the whole baseline generation
        _wait(lambda: len(calls) >= baseline_calls + 3 or not worker.is_alive(), "denoiser calls")
        assert worker.is_alive(), outcome
        assert studio.cancel("eval") is False  # another kind of run is left alone
        at_stop = len(calls)
        assert studio.cancel("compare") is True
        worker.join(timeout=60)
        assert not worker.is_alive()
    finally:
        counter.remove()
    assert isinstance(outcome.get("error"), Stopped) and "result" not in outcome
    assert len(calls) <= at_stop + 2  # it stopped at the next denoiser call (or the one after, in a race)
    assert len(calls) < 2 * baseline_calls and baseline_calls >= MAX_STEPS
    assert _processor_types(pipe) == stock  # the method's processors were removed
    assert len(studio.history) == history and sorted(studio.workdir.iterdir()) == folders  # nothing kept
    assert studio.cancel() is False  # nothing running now; the next run is not stopped by it
    studio.compare(PROMPT, "", 0, guidance_scale=4.0, method="Dense", parameters="{}", **TINY)
    assert len(studio.history) == history + 1


def test_stop_ends_a_running_guided_generation_and_keeps_nothing(studio):
    folders = sorted(studio.workdir.iterdir())
    calls = []

    def stop_in_the_guided_pass(module, args):  # the unguided generation is MAX_STEPS calls
        calls.append(1)
        if len(calls) == MAX_STEPS + 3:
            assert studio.cancel("compare") is False  # another kind of run is left alone
            assert studio.cancel("guided") is True

    hook = studio.pipe.transformer.register_forward_pre_hook(stop_in_the_guided_pass)
    try:
        with pytest.raises(Stopped):
            studio.guided(PROMPT, 0, MAX_STEPS, 9, 32, 32, guidance_scale=1.0, heads=["0.1"])
    finally:
        hook.remove()
    assert MAX_STEPS + 3 <= len(calls) <= MAX_STEPS + 5  # stopped at once, not after the guided pass
    assert not studio.lock.locked() and sorted(studio.workdir.iterdir()) == folders  # nothing kept
    assert studio.guided(PROMPT, 0, guidance_scale=1.0, heads=["0.1"], **TINY)["max_abs_diff"] > 0  # runs again


def test_app_wires_a_stop_to_every_long_run(studio):
    from dit_accel.ui.app import build_app

    app = build_app(studio)
    ids = {block._id: getattr(block, "elem_id", None) for block in app.blocks.values()}
    cancelling = {ids[t[0]] for dep in app.config["dependencies"] if dep.get("cancels") for t in dep["targets"]}
    assert {"stop-compare", "stop-guided", "stop-headhunt", "stop-eval"} <= cancelling, cancelling


def test_stopped_eval_resumes_to_the_uninterrupted_result(studio):
    configs = ("size: {num_frames: 5, height: 16, width: 16}\nsteps: 3\nconfigs:\n"
               "- {name: dense, attention: {method: Dense}}\n")
    results = studio.runs_dir / "stopped" / "results.jsonl"

    def stop_after_one_item(module, args):  # stop the eval once its first item is saved
        if results.is_file():
            studio.cancel("eval")

    hook = studio.pipe.transformer.register_forward_pre_hook(stop_after_one_item)
    try:
        with pytest.raises(Stopped):
            studio.run_eval("stopped", "shapes-heldout:2", configs, progress=False)
    finally:
        hook.remove()
    assert not studio.lock.locked()
    kept = len(results.read_text().splitlines())
    assert kept == 1  # 2 prompts x (baseline, dense): stopped after the first
    studio.run_eval("stopped", "shapes-heldout:2", configs, progress=False)
    studio.run_eval("fresh", "shapes-heldout:2", configs, progress=False)
    timing = ("latency_s", "step_s", "peak_memory_mb")

    def rows(name):
        found = [json.loads(line) for line in (studio.runs_dir / name / "results.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in timing} for r in found]

    resumed, fresh = rows("stopped"), rows("fresh")
    assert len(resumed) == 4 and resumed == fresh  # the same items, scores and checker results
    for row in resumed:
        assert np.array_equal(np.load(studio.runs_dir / "stopped" / row["video"]),
                              np.load(studio.runs_dir / "fresh" / row["video"]))


def test_stopped_head_search_resumes_from_its_cache(studio, tmp_path):
    settings = dict(prompts=1, rounds=1, objective="contrast", steps=1, num_frames=5, height=16, width=16,
                    guidance_scale=1.0, strength=0.9, scale=2.5, progress=False)
    earlier = set((studio.workdir / "headhunt-cache").glob("*/scores*.jsonl"))  # other tests' searches
    scores = lambda: [p for p in (studio.workdir / "headhunt-cache").glob("*/scores*.jsonl")  # noqa: E731
                      if p not in earlier]

    def stop_after_one_score(module, args):  # stop once the first head set's score is saved
        if scores() and scores()[0].read_text().strip():
            studio.cancel("headhunt")

    hook = studio.pipe.transformer.register_forward_pre_hook(stop_after_one_score)
    try:
        with pytest.raises(Stopped):
            studio.headhunt(**settings)
    finally:
        hook.remove()
    # stopped at the call that set the flag or the next one (the order of the two pre-hooks decides)
    assert 1 <= len(scores()[0].read_text().splitlines()) <= 2
    calls = []
    counter = studio.pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        resumed = studio.headhunt(**settings)
        resumed_calls = len(calls)
        fresh = Studio(pipe=studio.pipe, workdir=tmp_path / "fresh", runs_dir=tmp_path / "runs").headhunt(**settings)
    finally:
        counter.remove()
    assert resumed_calls < len(calls) - resumed_calls  # the rerun did not score the cached set again
    for key in ("heads", "score", "baseline", "effect_map"):
        assert resumed[key] == fresh[key], key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(studio):
    from dit_accel.ui.app import build_app

    app = build_app(studio)
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               allowed_paths=[str(studio.workdir), str(studio.runs_dir)])
    yield f"http://127.0.0.1:{port}"
    app.close()


def test_ten_concurrent_compares_complete_in_queue_order(studio, server):
    from gradio_client import Client
    from gradio_client.utils import Status

    client = Client(server, verbose=False)
    before = len(studio.history)
    jobs = []
    for seed in range(100, 110):  # each request is in the queue before the next is sent: that is the queue order
        jobs.append(client.submit(PROMPT, "", seed, TINY["steps"], TINY["num_frames"], TINY["height"], TINY["width"],
                                  4.0, "Dense", "{}", "", 1.0, 3.0, api_name="/compare"))
        deadline = time.time() + 60
        while jobs[-1].status().code in (Status.STARTING, Status.JOINING_QUEUE) and time.time() < deadline:
            time.sleep(0.02)
    assert sum(not j.done() for j in jobs) >= 5  # most were waiting at once
    results = [job.result(timeout=600) for job in jobs]
    assert len(results) == 10 and all(r[0] and r[1] and r[2] for r in results)
    assert [r["seed"] for r in studio.history[before:]] == list(range(100, 110))  # served in the order queued


# ----------------------------------------------------------------------------------------------
# a real browser


def _browser():
    required = os.environ.get("DIT_ACCEL_REQUIRE_BROWSER") == "1"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        chromium = None
    if chromium is None:
        if required:
            pytest.fail("DIT_ACCEL_REQUIRE_BROWSER=1 but Playwright or Chromium is missing")
        pytest.skip("Playwright and Chromium are needed for the browser tests (apt install chromium)")
    return chromium


@pytest.fixture(scope="module")
def page(server):
    chromium = _browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.hosts = set()
        page.on("request", lambda r: page.hosts.add(r.url.split("/")[2]))
        page.goto(server)
        page.wait_for_selector("#run-compare", timeout=60000)
        yield page
        browser.close()


def _shot(page, name):
    folder = Path(os.environ.get("DIT_ACCEL_ARTIFACTS", "artifacts/ui"))
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def _fill(page, elem_id, value):
    page.locator(f"#{elem_id} input, #{elem_id} textarea").first.fill(str(value))


def test_browser_compare_shows_both_outputs_timing_and_metrics(page):
    for key, elem in (("steps", "steps"), ("num_frames", "frames"), ("height", "height"), ("width", "width")):
        _fill(page, elem, TINY[key])
    page.click("#run-compare")
    page.wait_for_selector("#metrics table", timeout=300000)
    text = page.locator("#metrics").inner_text()
    assert re.search(r"baseline time\s+[\d.]+ s", text) and re.search(r"speedup\s+[\d.]+×", text)
    assert "PSNR vs baseline" in text and "VBench-style temporal flickering" in text
    assert "VBench-style dynamic degree" in text and "checker" in text
    for elem in ("out-baseline", "out-accelerated", "out-difference"):
        assert page.locator(f"#{elem} img").count() == 1
    _shot(page, "compare")
    assert page.hosts <= {page.url.split("/")[2]}, page.hosts  # nothing fetched from anywhere else


def test_browser_stop_cancels_the_running_compare(page, studio):
    history = len(studio.history)
    for elem, value in (("steps", MAX_STEPS), ("frames", 9), ("height", 32), ("width", 32)):
        _fill(page, elem, value)
    page.click("#run-compare")
    _wait(studio.lock.locked, "the compare to start")
    page.click("#stop-compare")
    page.locator("#metrics").get_by_text("Stopped: the compare was cancelled").wait_for(timeout=60000)
    _wait(lambda: not studio.lock.locked(), "the stopped compare to end", timeout=60)
    assert len(studio.history) == history  # it did not run to the end
    _shot(page, "stopped")
    for key, elem in (("steps", "steps"), ("num_frames", "frames"), ("height", "height"), ("width", "width")):
        _fill(page, elem, TINY[key])


def test_browser_bad_value_shows_the_error(page):
    _fill(page, "steps", 0)
    page.click("#run-compare")
    toast = page.get_by_text(re.compile("steps: must be a whole number"))
    toast.first.wait_for(timeout=60000)
    _shot(page, "error")
    _fill(page, "steps", TINY["steps"])


def test_browser_head_guidance_presets_and_generation(page, tmp_path):
    page.get_by_role("tab", name="Head guidance").click()
    page.locator("#layer-0").get_by_label("1").check()
    page.locator("#layer-5").get_by_label("2").check()
    slider = page.locator("#g-u input[type=number]")
    slider.fill("0.8")
    slider.press("Enter")
    page.click("#run-guided")
    info = page.locator("#guided-info")
    info.get_by_text(re.compile("max \\|diff\\|")).wait_for(timeout=300000)
    diff = float(re.search(r"max \|diff\| = ([\d.]+)", info.inner_text()).group(1))
    assert diff > 0  # the guided output differs from the unguided one
    assert page.locator("#out-unguided img").count() == 1 and page.locator("#out-guided img").count() == 1
    _shot(page, "guidance")

    preset = tmp_path / "heads.json"
    _fill(page, "preset-path", preset)
    page.click("#save-preset")
    page.locator("#preset-info").get_by_text("Saved 2 heads").wait_for(timeout=60000)
    saved = json.loads(preset.read_text())
    assert saved["heads"] == {"0": [1], "5": [2]} and saved["strength"] == pytest.approx(0.8)
    page.locator("#layer-0").get_by_label("1").uncheck()
    page.locator("#layer-5").get_by_label("2").uncheck()
    page.click("#load-preset")
    page.locator("#preset-info").get_by_text("Loaded 2 heads").wait_for(timeout=60000)
    assert page.locator("#layer-0").get_by_label("1").is_checked()
    assert page.locator("#layer-5").get_by_label("2").is_checked()


def test_browser_evals_tab_runs_and_shows_the_report(page):
    page.get_by_role("tab", name="Evals").click()
    _fill(page, "e-suite", "shapes-heldout:1")
    _fill(page, "e-name", "browser-eval")
    # Dense only: under the Triton interpreter the tests run, a sparse kernel on CPU takes minutes
    page.locator("#e-configs .cm-content").fill(
        "size: {num_frames: 5, height: 16, width: 16}\nsteps: 2\n"
        "configs:\n- {name: dense, attention: {method: Dense}}\n")
    page.click("#run-eval")
    page.locator("#e-report").get_by_text("dense").first.wait_for(timeout=600000)
    assert "baseline" in page.locator("#e-report").inner_text()
    _shot(page, "evals")


def _lan_address():
    """A non-loopback address of this machine, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_the_main_command_serves_the_reference_model_on_localhost_only(tmp_path):
    """`dit-accel ui` as the README runs it: the app comes up with the reference model loaded, on
    127.0.0.1 only."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    log = tmp_path / "ui.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "dit_accel.cli", "ui", "--port", str(port), "--device", "cpu",
                                 "--runs", str(tmp_path / "runs")], stdout=f, stderr=subprocess.STDOUT, env=env,
                                cwd=tmp_path)
    try:
        deadline = time.time() + 300
        while "Running on local URL" not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert f"http://127.0.0.1:{port}" in log.read_text(), log.read_text()
        config = urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=30).read().decode()
        assert "Pipeline: `reference` (ShapesPipeline)" in config
        lan = _lan_address()
        if lan is not None:
            with pytest.raises(OSError):
                socket.create_connection((lan, port), timeout=5).close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_a_saved_non_shapes_pipeline_runs_in_the_studio(tmp_path):
    """`--pipeline DIR` with another diffusers pipeline saved locally (a tiny random Wan pipeline with a
    word-level tokenizer and a tiny UMT5 encoder), loaded through `DiffusionPipeline.from_pretrained`:
    the baseline equals the same directory loaded and called independently on the same seed, the
    accelerated run gives a video of the same size, and the ShapesBench checker is not applied to it."""
    from diffusers import DiffusionPipeline
    from transformers import T5Config, UMT5EncoderModel

    from dit_accel.pipelines.shapes.pipeline import build_tokenizer
    from dit_accel.pipelines.tiny import make_tiny_pipeline
    from dit_accel.ui.core import to_gif

    pipe = make_tiny_pipeline("wan")
    tokenizer = build_tokenizer()
    pipe.register_modules(tokenizer=tokenizer, text_encoder=UMT5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_ff=32, d_kv=8, num_heads=2, num_layers=1)))
    pipe.save_pretrained(tmp_path / "tiny-wan")
    studio = Studio(pipeline=str(tmp_path / "tiny-wan"), device="cpu", workdir=tmp_path / "ui",
                    runs_dir=tmp_path / "runs")
    res = studio.compare(PROMPT, "", 5, **TINY, guidance_scale=3.0, method="TemporalSparse",
                         parameters='{"warmup_steps": 1, "estimate": false}')
    assert type(studio.pipe).__name__ == "WanPipeline"
    row = res["row"]
    assert row["checker_baseline"] is None and row["checker_accelerated"] is None
    assert row["size"] == "5x16x16" and 0 < row["density"] <= 1 and np.isfinite(row["psnr"])

    independent = DiffusionPipeline.from_pretrained(tmp_path / "tiny-wan", local_files_only=True)
    out = independent(prompt=PROMPT, generator=torch.Generator().manual_seed(5), output_type="np",
                      num_inference_steps=2, num_frames=5, height=16, width=16, guidance_scale=3.0)
    frames = np.round(metrics.to_frames(np.asarray(out.frames[0])) * 255) / 255
    expected = _gif_frames(to_gif(frames, tmp_path / "expected.gif"))
    assert np.array_equal(_gif_frames(res["baseline"]), expected)
    assert _gif_frames(res["accelerated"]).shape == expected.shape


def test_headhunt_from_the_app_saves_a_loadable_preset_with_its_effect_map(studio):
    res = studio.headhunt(prompts=1, rounds=1, objective="contrast", steps=1, num_frames=5, height=16, width=16,
                          guidance_scale=1.0, progress=False)
    data = studio.load_preset(res["preset"])
    assert data["heads"] == res["heads"] and data["effect_map"] == res["effect_map"]
    values = [v for row in res["effect_map"]["values"] for v in row]
    assert len(values) == 32 and all(v is not None for v in values)  # every head of the reference model scored
    with pytest.raises(UIError, match="objective 'clip:/nowhere'"):
        studio.headhunt(objective="clip:/nowhere")


def test_a_progress_bar_made_before_gradio_tracks_tqdm_closes_without_an_error():
    """Gradio's track_tqdm patch reads an attribute only bars made after it have; a bar made before it
    (a pipeline's loading bar) must still close and be collected without an ignored AttributeError. Run in a
    fresh interpreter, so tqdm is unpatched when the bar is made."""
    code = """
import gc, sys
ignored = []
sys.unraisablehook = lambda u: ignored.append(repr(u.exc_value))
from tqdm.auto import tqdm
before = tqdm(range(3), disable=True)
import dit_accel.ui.app
from gradio.helpers import patch_tqdm
patch_tqdm()
del before
gc.collect()
after = tqdm(range(3), disable=True)
after.close()
print("IGNORED", ignored)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "IGNORED []" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
