"""The Gradio app: compare speed against quality, tune head guidance, run evals.

    dit-accel ui [--pipeline reference|DIR] [--host 127.0.0.1] [--port 7860]

Offline by design: analytics off, system fonts (no font CDN), the pipeline loaded once and reused.
Requests queue (one generation at a time); invalid input is shown as an error message and the
server keeps running; long runs have a Stop button.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

from .core import (  # noqa: E402
    HISTORY_COLUMNS,
    METHOD_NAMES,
    Stopped,
    Studio,
    UIError,
    effect_map_image,
    method_defaults,
)


def _tolerate_bars_made_before_gradio() -> None:
    """Gradio's ``track_tqdm`` patches tqdm's methods to read ``self._progress``, which only bars created after
    the patch have: a bar made before it (a pipeline's loading bar, say) raised AttributeError when it was closed
    or garbage-collected ("Exception ignored in tqdm.__del__"). A class-level default of None lets those bars
    close as plain tqdm bars; bars made after the patch set their own value."""
    import tqdm

    if not hasattr(tqdm.tqdm, "_progress"):
        tqdm.tqdm._progress = None


_tolerate_bars_made_before_gradio()

THEME_FONTS = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def _errors(fn):
    """Bad input becomes a message in the page (gr.Error), never a crashed request."""
    import functools

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UIError, Stopped) as exc:
            raise gr.Error(str(exc)) from None

    return wrapped


def _history_frame(studio: Studio) -> pd.DataFrame:
    return pd.DataFrame(studio.history, columns=HISTORY_COLUMNS)


def _metrics_markdown(row: dict) -> str:
    def f(v, fmt="{:.3f}"):
        return "–" if v is None else fmt.format(v)

    lines = ["| metric | value |", "|---|---|",
             f"| baseline time | {f(row['baseline_s'])} s |", f"| accelerated time | {f(row['accelerated_s'])} s |",
             f"| speedup | {f(row['speedup'], '{:.2f}')}× |", f"| attention density | {f(row['density'])} |",
             "| computed-block fraction | – (no cache) |",
             f"| PSNR vs baseline | {f(row['psnr'], '{:.2f}')} dB |",
             f"| SSIM vs baseline | {f(row['ssim'], '{:.4f}')} |",
             f"| checker (baseline / accelerated) | {f(row['checker_baseline'])} / {f(row['checker_accelerated'])} |"]
    for key, value in row.items():
        if key.startswith("vbench_"):
            shown = ("yes" if value else "no") if isinstance(value, bool) else f(value, "{:.4f}")
            lines.append(f"| VBench-style {key[7:].replace('_', ' ')} | {shown} |")
    return "\n".join(lines)


def build_app(studio: Studio | None = None) -> gr.Blocks:
    studio = studio or Studio()
    layers = studio.layers()
    size_defaults = dict(steps=8, num_frames=9, height=32, width=32)

    def stopper(kind: str, message: str):
        """A Stop button's handler: Gradio drops the event if it is still queued (``cancels``); a
        running ``kind`` of run stops at its next denoiser call, and ``message`` takes the place of
        its result."""
        def stop():
            return message if studio.cancel(kind) else gr.update()
        return stop

    with gr.Blocks(title="dit-accel", analytics_enabled=False) as app:
        gr.Markdown("## dit-accel — faster, better-guided diffusion transformers\n"
                    f"Pipeline: `{studio.pipeline}` ({type(studio.pipe).__name__}).")
        with gr.Tab("Compare", id="compare"):
            with gr.Row():
                with gr.Column(scale=2):
                    prompt = gr.Textbox(label="Prompt", value="a red circle moving right on a dark blue background",
                                        elem_id="prompt")
                    negative = gr.Textbox(label="Negative prompt", value="", elem_id="negative")
                    with gr.Row():
                        seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                        steps = gr.Number(label="Steps", value=size_defaults["steps"], precision=0, elem_id="steps")
                        cfg = gr.Number(label="CFG", value=4.0, elem_id="cfg")
                    with gr.Row():
                        frames = gr.Number(label="Frames", value=size_defaults["num_frames"], precision=0,
                                           elem_id="frames")
                        height = gr.Number(label="Height", value=size_defaults["height"], precision=0, elem_id="height")
                        width = gr.Number(label="Width", value=size_defaults["width"], precision=0, elem_id="width")
                with gr.Column(scale=2):
                    method = gr.Dropdown(list(METHOD_NAMES), value="Neighborhood", label="Attention method",
                                         elem_id="method")
                    params = gr.Code(value=method_defaults("Neighborhood"), language="json",
                                     label="Method parameters (from its config dataclass)", elem_id="params")
                    gr.Markdown("Cache: none yet (caching schedules are an open issue).")
                    with gr.Row():
                        c_heads = gr.Textbox(label="SoftPAG heads (LAYER.HEAD, comma-separated; empty: none)",
                                             value="", elem_id="compare-heads")
                        c_u = gr.Number(label="u", value=1.0, elem_id="compare-u")
                        c_s = gr.Number(label="s", value=3.0, elem_id="compare-s")
            with gr.Row():
                run = gr.Button("Run baseline and accelerated", variant="primary", elem_id="run-compare")
                stop = gr.Button("Stop", elem_id="stop-compare")
            with gr.Row():
                out_base = gr.Image(label="Baseline", type="filepath", elem_id="out-baseline")
                out_accel = gr.Image(label="Accelerated", type="filepath", elem_id="out-accelerated")
                out_diff = gr.Image(label="Difference (x4)", type="filepath", elem_id="out-difference")
            metrics_md = gr.Markdown(elem_id="metrics")
            history = gr.Dataframe(value=_history_frame(studio), label="History (this session)", elem_id="history",
                                   interactive=False)
            scatter = gr.ScatterPlot(value=_history_frame(studio), x="speedup", y="psnr", color="method",
                                     label="Speed vs quality (all runs)", elem_id="scatter")
            with gr.Row():
                export_csv = gr.Button("Export CSV", elem_id="export-csv")
                export_json = gr.Button("Export JSON", elem_id="export-json")
                export_file = gr.File(label="Export", elem_id="export-file")

            method.change(lambda m: method_defaults(m), method, params)

            @_errors
            def do_compare(p, n, sd, st, fr, h, w, g, m, prm, hd, u, s):
                res = studio.compare(p, n, sd, st, fr, h, w, g, m, prm, hd, u, s)
                frame = _history_frame(studio)
                return (str(res["baseline"]), str(res["accelerated"]), str(res["difference"]),
                        _metrics_markdown(res["row"]), frame, frame)

            event = run.click(do_compare, [prompt, negative, seed, steps, frames, height, width, cfg, method, params,
                                           c_heads, c_u, c_s],
                              [out_base, out_accel, out_diff, metrics_md, history, scatter], api_name="compare")
            stop.click(stopper("compare", "Stopped: the compare was cancelled; nothing of it was kept."), None,
                       metrics_md, cancels=[event])
            export_csv.click(_errors(lambda: str(studio.export("csv"))), None, export_file)
            export_json.click(_errors(lambda: str(studio.export("json"))), None, export_file)

        with gr.Tab("Head guidance", id="guidance"):
            effect = gr.State(None)
            with gr.Row():
                with gr.Column(scale=2):
                    grid = [gr.CheckboxGroup([str(h) for h in range(n)], label=f"layer {layer}",
                                             elem_id=f"layer-{layer}") for layer, n in layers.items()]
                with gr.Column(scale=3):
                    heatmap = gr.Image(value=str(effect_map_image(None, layers)), type="filepath",
                                       label="Layer x head effect map", elem_id="heatmap")
            with gr.Row():
                g_prompt = gr.Textbox(label="Prompt", value="a red circle moving right on a dark blue background",
                                      elem_id="g-prompt")
                g_seed = gr.Number(label="Seed", value=0, precision=0, elem_id="g-seed")
                g_cfg = gr.Number(label="CFG", value=1.0, elem_id="g-cfg")
            with gr.Row():
                g_u = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="SoftPAG strength u", elem_id="g-u")
                g_s = gr.Slider(0.0, 10.0, value=3.0, step=0.1, label="SoftPAG scale s", elem_id="g-s")
            with gr.Row():
                g_run = gr.Button("Generate without / with guidance", variant="primary", elem_id="run-guided")
                g_stop = gr.Button("Stop", elem_id="stop-guided")
            with gr.Row():
                g_plain = gr.Image(label="Unguided", type="filepath", elem_id="out-unguided")
                g_guided = gr.Image(label="Guided", type="filepath", elem_id="out-guided")
            g_info = gr.Markdown(elem_id="guided-info")
            with gr.Row():
                preset_path = gr.Textbox(label="Preset file", value=str(studio.workdir / "heads.json"),
                                         elem_id="preset-path")
                save = gr.Button("Save preset", elem_id="save-preset")
                load = gr.Button("Load preset", elem_id="load-preset")
            preset_info = gr.Markdown(elem_id="preset-info")
            with gr.Row():
                hh_prompts = gr.Number(label="Search prompts", value=4, precision=0, elem_id="hh-prompts")
                hh_rounds = gr.Number(label="Rounds", value=1, precision=0, elem_id="hh-rounds")
                hh_objective = gr.Dropdown(["checker", "sharpness", "contrast", "colorfulness"], value="checker",
                                           label="Objective", elem_id="hh-objective")
                hh_run = gr.Button("Start HeadHunter search", elem_id="run-headhunt")
                hh_stop = gr.Button("Stop search", elem_id="stop-headhunt")
            hh_info = gr.Markdown(elem_id="headhunt-info")

            def selected(*groups) -> list[str]:
                return [f"{layer}.{h}" for layer, hs in zip(layers, groups) for h in (hs or [])]

            def set_grid(heads) -> list:
                chosen = {}
                for item in heads:
                    layer, _, h = item.partition(".")
                    chosen.setdefault(int(layer), []).append(h)
                return [gr.update(value=chosen.get(layer, [])) for layer in layers]

            def redraw(eff, *groups):
                return str(effect_map_image(eff, layers, selected(*groups), studio.workdir / "heads.png"))

            for g in grid:
                g.change(redraw, [effect, *grid], heatmap)

            @_errors
            def do_guided(p, sd, g, u, s, *groups):
                res = studio.guided(p, sd, size_defaults["steps"], size_defaults["num_frames"], size_defaults["height"],
                                    size_defaults["width"], g, selected(*groups), u, s)
                info = (f"Guided differs from unguided: max |diff| = {res['max_abs_diff']:.4f}, PSNR "
                        f"{res['psnr']:.2f} dB; checker {res['checker_unguided']} -> {res['checker_guided']}")
                return str(res["unguided"]), str(res["guided"]), info

            g_event = g_run.click(do_guided, [g_prompt, g_seed, g_cfg, g_u, g_s, *grid], [g_plain, g_guided, g_info],
                                  api_name="guided")
            g_stop.click(stopper("guided", "Stopped: the guided generation was cancelled; nothing of it was kept."),
                         None, g_info, cancels=[g_event])

            @_errors
            def do_save(path, u, s, eff, *groups):
                saved = studio.save_preset(path, selected(*groups), u, s, eff)
                return f"Saved {len(selected(*groups))} heads to `{saved}`."

            save.click(do_save, [preset_path, g_u, g_s, effect, *grid], preset_info)

            @_errors
            def do_load(path):
                data = studio.load_preset(path)
                image = str(effect_map_image(data["effect_map"], layers, data["heads"], studio.workdir / "heads.png"))
                return (f"Loaded {len(data['heads'])} heads from `{path}`.", data["strength"], data["scale"],
                        data["effect_map"], image, *set_grid(data["heads"]))

            load.click(do_load, preset_path, [preset_info, g_u, g_s, effect, heatmap, *grid])

            @_errors
            def do_headhunt(n, r, obj, g, u, s, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (Gradio's API)
                res = studio.headhunt(n, r, obj, size_defaults["steps"], size_defaults["num_frames"],
                                      size_defaults["height"], size_defaults["width"], g, u, s)
                image = str(effect_map_image(res["effect_map"], layers, res["heads"], studio.workdir / "heads.png"))
                info = (f"Search done ({res['stopped']}): heads {res['heads'] or 'none'}; {obj} "
                        f"{res['baseline']:.4f} -> {res['score']:.4f}. Preset: `{res['preset']}`.")
                return (info, res["effect_map"], image, str(res["preset"]), *set_grid(res["heads"]))

            hh_event = hh_run.click(do_headhunt, [hh_prompts, hh_rounds, hh_objective, g_cfg, g_u, g_s],
                                    [hh_info, effect, heatmap, preset_path, *grid])
            hh_stop.click(stopper("headhunt", "Stopped: the head search was cancelled; its score cache is kept, so "
                                             "searching again resumes."), None, hh_info, cancels=[hh_event])

        with gr.Tab("Evals", id="evals"):
            with gr.Row():
                e_name = gr.Textbox(label="Run name", value="ui-eval", elem_id="e-name")
                e_suite = gr.Textbox(label="Suite", value="shapes-heldout:2", elem_id="e-suite")
            e_configs = gr.Code(language="yaml", label="Configs (YAML)", elem_id="e-configs", value=(
                "size: {num_frames: 9, height: 32, width: 32}\nsteps: 4\nconfigs:\n  - name: neighborhood\n"
                "    attention: {method: Neighborhood, window: [0.5, 0.5, 0.5]}\n"))
            with gr.Row():
                e_run = gr.Button("Run eval", variant="primary", elem_id="run-eval")
                e_stop = gr.Button("Stop", elem_id="stop-eval")
                e_past = gr.Dropdown(studio.past_runs(), label="Past runs", elem_id="e-past", allow_custom_value=True)
                e_open = gr.Button("Open", elem_id="open-eval")
            e_report = gr.Markdown(elem_id="e-report")
            e_pareto = gr.Image(label="Pareto", type="filepath", elem_id="e-pareto")

            @_errors
            def do_eval(name, suite, configs, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
                res = studio.run_eval(name, suite, configs)
                return (res["markdown"], None if res["pareto"] is None else str(res["pareto"]),
                        gr.update(choices=studio.past_runs(), value=name))

            e_event = e_run.click(do_eval, [e_name, e_suite, e_configs], [e_report, e_pareto, e_past])
            e_stop.click(stopper("eval", "Stopped: the eval was cancelled; its finished items are kept, so running it "
                                     "again resumes."), None, e_report, cancels=[e_event])

            @_errors
            def do_open(name):
                res = studio.open_run(name)
                return res["markdown"], None if res["pareto"] is None else str(res["pareto"])

            e_open.click(do_open, e_past, [e_report, e_pareto])
    app.queue(default_concurrency_limit=1)
    return app


def launch(pipeline: str = "reference", host: str = "127.0.0.1", port: int = 7860, device=None,
           runs_dir: str = "runs", prevent_thread_lock: bool = False):
    studio = Studio(pipeline=pipeline, device=device, runs_dir=runs_dir)
    app = build_app(studio)
    theme = gr.themes.Default(**THEME_FONTS)
    return app.launch(server_name=host, server_port=port, theme=theme, allowed_paths=[str(studio.workdir),
                      str(studio.runs_dir.resolve())], prevent_thread_lock=prevent_thread_lock, footer_links=[],
                      show_error=True)


__all__ = ["build_app", "launch"]


if __name__ == "__main__":  # python -m dit_accel.ui.app
    import sys

    from dit_accel.cli import main

    sys.exit(main(["ui", *sys.argv[1:]]))
