"""The README's screenshots, taken from the running app in headless Chromium.

    python -m dit_accel.ui.screenshots --out docs/ui [--chromium /usr/bin/chromium]

Compare tab: a Neighborhood run at 9x32x32, 8 steps, on CPU. Head guidance tab: the committed
HeadHunter preset (its effect map colors the grid) and a guided generation. Evals tab: the
committed example eval run (H100) opened from benchmarks/results.
"""

from __future__ import annotations

import argparse
import shutil
import socket
from pathlib import Path

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/ui")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if not args.chromium:
        raise SystemExit("--chromium: no Chromium found (apt install chromium)")
    from playwright.sync_api import sync_playwright

    from .app import build_app
    from .core import Studio

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    studio = Studio(device=args.device, runs_dir=RESULTS)
    app = build_app(studio)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               allowed_paths=[str(studio.workdir), str(RESULTS)])
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1400})
            page.goto(f"http://127.0.0.1:{port}")
            page.wait_for_selector("#run-compare")
            page.locator("#steps input").fill("8")
            page.click("#run-compare")
            page.wait_for_selector("#metrics table", timeout=600000)
            page.screenshot(path=str(out / "compare.png"), full_page=True)

            page.get_by_role("tab", name="Head guidance").click()
            page.locator("#preset-path input, #preset-path textarea").first.fill(
                str(RESULTS / "headhunt-preset-checker-nocfg.json"))
            page.click("#load-preset")
            page.locator("#preset-info").get_by_text("Loaded").wait_for(timeout=60000)
            page.click("#run-guided")
            page.locator("#guided-info").get_by_text("max |diff|").wait_for(timeout=600000)
            page.screenshot(path=str(out / "guidance.png"), full_page=True)

            page.get_by_role("tab", name="Evals").click()
            page.locator("#e-past input").fill("eval-sparse-example")
            page.locator("#e-past input").press("Enter")
            page.click("#open-eval")
            page.locator("#e-report").get_by_text("eval-sparse-example").wait_for(timeout=60000)
            page.screenshot(path=str(out / "evals.png"), full_page=True)
            browser.close()
    finally:
        app.close()
    print(f"wrote {', '.join(str(out / n) for n in ('compare.png', 'guidance.png', 'evals.png'))}")


if __name__ == "__main__":
    main()
