"""Probe: does reusing the skipped tiles' output from the last full pass bring tile skipping close to
dense on the ShapesBench reference model?

    python -m dit_accel.benchmarks.sparse_cached                    # GPU, 64 held-out prompts
    python -m dit_accel.benchmarks.sparse_cached --prompts 1 --steps 4 --configs "keep 0.3, refresh off"   # smoke
    python -m dit_accel.benchmarks.sparse_cached --schedules "0,1,2,5,9,13,17" --forecast 0,1   # ScheduledTiles

The reference model attends broadly, so the tiles a sparse pass skips carry much of the attention
mass (``sparse_quality.py``). Here a `TemporalSparse` held at a fixed share of key tiles (the most
weighted ones after each full pass; the layout stays fixed between full passes) also keeps, from each
full pass, the attention output and log-sum-exp of the tiles it is about to skip (one more kernel
pass over those tiles), and merges that stale part into every following sparse pass through the
log-sum-exp, as caching methods reuse a block's output across steps (``--reuse merge``); or keeps
the full output minus the kept tiles' output and adds that difference to every sparse pass
(``delta``). Without either (``drop``) the same layouts simply drop those tiles. ``frozen`` merges
like ``merge`` but keeps the layout chosen at the last warm-up step for the whole generation (full
passes then only renew the cache), so that consecutive full passes cache the same tiles;
``extrapolate`` does the same and, once two full passes are cached, merges their first-order
forecast at the current step instead of the last one (TaylorSeer's forecast, applied to the skipped
tiles' output and log-sum-exp; one more output and log-sum-exp in memory). Density counts
full passes as 1 and sparse passes by their layout (the extra pass at a full step is not counted: a
full pass split in two does the same work). Memory: one output and one log-sum-exp (``delta``: one
float32 output) per layer and CFG branch.

``--schedules`` runs `ScheduledTiles` instead: full passes at the listed steps only, the layout frozen
after the leading full steps, and the skipped tiles' part forecast by the polynomial through the last
one, two or three full passes (``--forecast``: 0, 1, 2; a ``t`` suffix forecasts in the scheduler's
timestep instead of the step index), optionally with an adaptive extra full pass per layer and CFG
branch (``--refresh-above``) or some blocks dense throughout (``--dense-layers``), and with the skipped
tiles' forecast corrected by summary tokens (``--correct``, ``--pool``: a control variate; their query
pairs are counted in density).

Writes ``benchmarks/results/sparse-cached-<device>-<date>.json`` (or ``--out DIR``).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import torch
from dit_accel.benchmarks.report import command_line
from dit_accel.benchmarks.sparse_pooled import probe_configs, probe_parser, run_probe
from dit_accel.kernels.block_sparse import TILE, _tile_len_mask, block_sparse_attention, tiles_to_blocks
from dit_accel.kernels.tile_order import window_tiles
from dit_accel.methods.estimate import forecast, merge, summary_attention
from dit_accel.methods.sparse import _full_layout, kernel_pass

from dit_accel import Neighborhood, TemporalSparse


@dataclass
class HeldTiles(TemporalSparse):
    """TemporalSparse at a fixed share ``keep`` of key tiles, optionally reusing the skipped tiles'
    contribution from the last full pass: ``reuse="merge"`` keeps their output and log-sum-exp and
    merges them with each sparse pass; ``reuse="delta"`` keeps the full pass's output minus the
    kept tiles' output and adds that difference to each sparse pass; ``"frozen"`` / ``"extrapolate"``
    merge with the layout of the last warm-up step kept for the generation, the latter the forecast
    of two full passes (see the module docstring); ``None`` drops them."""

    keep: float = 0.25
    reuse: str | None = "merge"

    def __post_init__(self) -> None:
        self.threshold, self.min_density, self.max_density, self.refresh_tol = float("inf"), self.keep, self.keep, None
        self.estimate = False  # TemporalSparse's skip-and-drop path, which the probe builds on
        super().__post_init__()

    def __call__(self, query, key, value, attn_mask, call=None):
        order = self._order(query, key, attn_mask, call)
        if order is None or self.reuse is None or self._dense_step(order, call, query):
            return super().__call__(query, key, value, attn_mask, call)
        state, step = call.state, call.layout.step_index
        since = step - self.warmup_steps
        if (step < self.warmup_steps or "blocks" not in state
                or (self.refresh_every > 0 and since > 0 and since % self.refresh_every == 0)):
            out = super().__call__(query, key, value, attn_mask, call)  # full pass; next layout in state
            frozen = self.reuse in ("frozen", "extrapolate")
            if frozen and "frozen" in state:
                state["blocks"], state["counts"] = state["frozen"]
            elif frozen and step >= self.warmup_steps - 1:
                state["frozen"] = (state["blocks"], state["counts"])
            pairs, skipped = self._split(state, order, query.device)
            if self.reuse == "delta":
                kept = block_sparse_attention(query, key, value, state["blocks"], state["counts"],
                                              tile_len=order.tile_len, seq_index=order.index)
                state["cached"] = (out.float() - kept.float(), None, pairs)
                return out
            rest, lse = self._pass(query, key, value, order, *skipped)
            state["cached"] = (rest, lse, pairs)
            if frozen and "frozen" in state:  # the last two full passes over the same skipped tiles
                state["history"] = [*state.get("history", [])[-1:], (rest, lse, step)]
            return out
        rest, rest_lse, pairs = state["cached"]
        if self.reuse == "extrapolate" and len(state.get("history", ())) == 2:
            rest, rest_lse = forecast(state["history"], step)
        B, H = query.shape[:2]
        self._count(pairs, order, B * H)
        if self.reuse == "delta":
            out = block_sparse_attention(query, key, value, state["blocks"], state["counts"], tile_len=order.tile_len,
                                         seq_index=order.index)
            return (out.float() + rest).to(out.dtype)
        return merge(*self._pass(query, key, value, order, state["blocks"], state["counts"]), rest, rest_lse)

    def _split(self, state: dict, order, device):
        """(token pairs per attention row of one (batch, head) that the layout in ``state`` visits,
        and the complement layout ``(blocks, counts)``: the tiles it skips). The layout's batch and
        head dims may be 1 (a window shared by every row)."""
        mask = self.tile_mask(state, order.tile_len.numel())
        lens = order.tile_len.double()
        pairs = float(torch.einsum("bhqk,q,k->", mask.double(), lens, lens)) / mask.shape[:2].numel()
        return pairs, tuple(t.to(device) for t in tiles_to_blocks(~mask))

    _pass = staticmethod(kernel_pass)  # (output, log-sum-exp in model order) over (blocks, counts)


@dataclass
class ScheduledTiles(HeldTiles):
    """Full passes at the given steps (``full_steps``), sparse passes over one frozen layout in
    between, the skipped tiles' (output, log-sum-exp) forecast from the last ``forecast + 1`` full
    passes by the polynomial through them (0: the last pass as it was, as ``merge``; 1: the line
    through two, as ``extrapolate``; 2: the parabola through three). ``clock``: the variable of the
    forecast, ``"step"`` (the step index) or ``"timestep"`` (the scheduler's timestep, spaced
    unevenly: the last steps of a shifted flow-matching schedule are the longest). The layout is the
    most weighted ``keep`` of the key tiles after the last of the leading full steps (0, 1, ...).

    ``refresh_above`` (adaptive refresh, per layer and CFG branch): full passes also keep the kept
    tiles' part; a sparse pass whose kept tiles' output misses its own forecast by more than this
    (relative L2 over the call) also computes the skipped tiles, so it becomes a full pass (counted
    as one) that renews the forecast. One host sync per sparse pass. ``damp`` scales the forecast's
    change from the newest full pass (1: the polynomial itself). ``window``: visit `Neighborhood`'s
    window of tiles (padded 3D tiles, as `Neighborhood` lays them out) instead of the most weighted
    ``keep`` of them between full passes (``window_plus_keep``: the window and those tiles).

    ``correct`` (a control variate): every pass also attends to summary tokens of the skipped tiles
    (`summary_attention`, ``pool`` keys per token; their query pairs count in density), and a sparse pass adds
    ``correct`` times the summary part's miss of its own forecast to the forecast of the skipped
    tiles' output and log-sum-exp, so the skipped part follows what the current queries, keys and
    values do to their summary (0: off)."""

    full_steps: tuple = (0, 1, 5, 8, 11, 14, 17)
    forecast: int = 1
    clock: str = "step"
    refresh_above: float | None = None
    damp: float = 1.0
    window: tuple | None = None
    window_plus_keep: bool = False
    correct: float = 0.0
    pool: int = TILE

    def __post_init__(self) -> None:
        self.full_steps = tuple(sorted(int(s) for s in self.full_steps))
        if not self.full_steps or self.full_steps[0] != 0:
            raise ValueError(f"ScheduledTiles(full_steps={self.full_steps}): the first step must be a full pass")
        if self.forecast not in (0, 1, 2) or self.clock not in ("step", "timestep"):
            raise ValueError(f"ScheduledTiles(forecast={self.forecast}, clock={self.clock!r}): forecast 0, 1 or 2; "
                             "clock 'step' or 'timestep'")
        if self.refresh_above is not None and not self.refresh_above >= 0:
            raise ValueError(f"ScheduledTiles(refresh_above={self.refresh_above}): a relative error >= 0, or None")
        if self.correct and (self.pool < 1 or TILE % self.pool):
            raise ValueError(f"ScheduledTiles(pool={self.pool}): keys per summary token must divide the tile ({TILE})")
        if self.window is not None:
            self._neighborhood = Neighborhood(window=self.window)  # checks the window
            self.packed = False
        lead = 0
        while lead + 1 in self.full_steps:
            lead += 1
        self._freeze_at = lead
        super().__post_init__()

    def __call__(self, query, key, value, attn_mask, call=None):
        order = self._order(query, key, attn_mask, call)
        if order is None or self._dense_step(order, call, query):
            return self._dense(query, key, value, attn_mask, call)
        state, step = call.state, call.layout.step_index
        at = float(step if self.clock == "step" else call.layout.timestep.flatten()[0])
        B, H = query.shape[:2]
        n = order.tile_len.numel()
        if step in self.full_steps or "frozen" not in state:
            if "full" not in state:
                state["full"] = _full_layout(n, query.device)
            self._count_full(order, B * H)
            out, gap = self._attend(query, key, value, order, state, *state["full"], True)
            if step <= self._freeze_at or "frozen" not in state:
                if self.window is None or self.window_plus_keep:
                    self._update(state, gap, *state["full"], order, True, B * H)
                if self.window is not None:
                    tiles = window_tiles(order, self._neighborhood.window_tokens(order.grid))[None, None]
                    if self.window_plus_keep:
                        tiles = tiles.to(query.device) | self.tile_mask(state, n)
                    state["blocks"], state["counts"] = (t.to(query.device) for t in tiles_to_blocks(tiles))
                state["blocks"], state["counts"] = state["frozen"] = (state["blocks"], state["counts"])
                # a new layout: earlier passes cached other tiles
                state["history"], state["kept_history"], state["summary_history"] = [], [], []
                state["pairs"], state["rest"] = self._split(state, order, query.device)
                state["summary_pairs"] = self._summary_pairs(state, order) if self.correct else 0.0
            kept = None
            if self.refresh_above is not None:
                kept = self._pass(query, key, value, order, state["blocks"], state["counts"])
            summary = self._summary(query, key, value, order, state) if step >= self._freeze_at else None
            self._remember(state, self._pass(query, key, value, order, *state["rest"]), kept, at, summary)
            return out
        kept = self._pass(query, key, value, order, state["blocks"], state["counts"])
        if self.refresh_above is not None and state["kept_history"]:
            guess = forecast(state["kept_history"], at, self.damp)[0].float()
            miss = float((kept[0].float() - guess).norm() / kept[0].float().norm().clamp_min(1e-30))
            if miss > self.refresh_above:  # the forecast has drifted: compute the skipped tiles too
                self._count_full(order, B * H)
                rest = self._pass(query, key, value, order, *state["rest"])
                self._remember(state, rest, kept, at, self._summary(query, key, value, order, state))
                return merge(*kept, *rest)
        self._count(state["pairs"], order, B * H)
        rest_out, rest_lse = forecast(state["history"], at, self.damp)
        if self.correct:
            now_out, now_lse = self._summary(query, key, value, order, state)
            guess_out, guess_lse = forecast(state["summary_history"], at, self.damp)
            ok = torch.isfinite(now_lse) & torch.isfinite(guess_lse) & torch.isfinite(rest_lse)
            rest_out = torch.where(ok[..., None], rest_out.float() + self.correct * (now_out - guess_out.float()),
                                   rest_out.float()).to(rest_out.dtype)
            rest_lse = torch.where(ok, rest_lse + self.correct * (now_lse - guess_lse), rest_lse)
        return merge(*kept, rest_out, rest_lse)

    def _summary(self, query, key, value, order, state):
        """With ``correct``: the skipped tiles' summary part ``(output, log-sum-exp)`` in model order
        (`summary_attention` with ``pool``; its query-summary pairs are counted as computed), else None."""
        if not self.correct:
            return None
        self._pairs[0] += state["summary_pairs"] * query.shape[0] * query.shape[1]
        out, lse, _, _ = summary_attention(query, key, value, state["blocks"], state["counts"], order.tile_len,
                                           order.index, self.pool)
        return order.scatter(out), order.scatter(lse)

    def _summary_pairs(self, state: dict, order) -> float:
        """Query-summary pairs per attention row of one (batch, head): every query meets one summary
        token per non-empty run of ``pool`` slots of each key tile its layout skips."""
        n = order.tile_len.numel()
        runs = _tile_len_mask(order.tile_len, n * TILE, TILE).view(n, TILE // self.pool, self.pool).any(-1).sum(-1)
        skipped = ~self.tile_mask(state, n)
        total = torch.einsum("bhqk,q,k->", skipped.double(), order.tile_len.double(), runs.double().to(skipped.device))
        return float(total) / skipped.shape[:2].numel()

    def _remember(self, state: dict, rest, kept, at: float, summary=None) -> None:
        """Add a full pass's skipped (and, for the adaptive refresh, kept; for ``correct``, the summary)
        tiles' part to the forecast's history, keeping the last ``forecast + 1`` passes."""
        for name, part in (("history", rest), ("kept_history", kept), ("summary_history", summary)):
            if part is not None:
                older = state[name][-self.forecast:] if self.forecast else []
                state[name] = [*older, (*part, at)]


CONFIGS = {  # name: (keep, refresh_every); 20 steps, 2 warm-up (full) steps
    "keep 0.3, refresh off": (0.3, 0),
    "keep 0.25, refresh every 9": (0.25, 9),
    "keep 0.25, refresh every 6": (0.25, 6),
    "keep 0.2, refresh every 6": (0.2, 6),
    "keep 0.1, refresh every 4": (0.1, 4),
    "keep 0.05, refresh every 3": (0.05, 3),
}
REUSE = {"drop": None, "merge": "merge", "delta": "delta", "frozen": "frozen", "extrapolate": "extrapolate"}


def main(argv=None) -> None:
    ap = probe_parser(__doc__, CONFIGS, "sparse-cached")
    ap.add_argument("--reuse", default="drop,merge", help=f"comma-separated, from: {', '.join(REUSE)}")
    ap.add_argument("--schedules", default=None,
                    help="';'-separated full-pass steps, e.g. '0,1,5,8,11,14,17;0,1,3,6,9,12,15': instead of "
                         "--configs/--reuse, run ScheduledTiles for each schedule, --forecast and --keep")
    ap.add_argument("--forecast", default="0,1,1t,2t",
                    help="with --schedules: comma-separated forecast orders 0/1/2, 't' for the timestep clock")
    ap.add_argument("--keep", type=float, default=0.05, help="with --schedules: share of key tiles in sparse passes")
    ap.add_argument("--refresh-above", default="",
                    help="with --schedules: comma-separated adaptive refresh thresholds (relative L2 miss of the kept "
                         "tiles' forecast), each a variant; 'off' for none (default: off only)")
    ap.add_argument("--dense-layers", default="",
                    help="with --schedules: ';'-separated sets of transformer blocks that run dense at every step, "
                         "each a variant, e.g. '0;7;0,7' ('none' for the empty set; default: none only)")
    ap.add_argument("--window", default="",
                    help="with --schedules: ';'-separated Neighborhood windows 't,h,w' (tokens, or fractions of the "
                         "grid) visited between full passes instead of the --keep share, each a variant")
    ap.add_argument("--window-plus-keep", action="store_true",
                    help="with --window: visit the window and the --keep share of most weighted tiles")
    ap.add_argument("--damp", default="1", help="with --schedules: comma-separated factors on the forecast's change "
                                                 "from the newest full pass, each a variant")
    ap.add_argument("--correct", default="0",
                    help="with --schedules: comma-separated factors on the summary tokens' miss of their own "
                         "forecast added to the skipped tiles' forecast (0: off), each a variant")
    ap.add_argument("--pool", default=str(TILE),
                    help=f"with --correct: comma-separated keys per summary token (divisors of {TILE}), each a variant")
    args = ap.parse_args(argv)
    command = command_line("dit_accel.benchmarks.sparse_cached", argv)
    if args.schedules is not None:
        run_probe(args, scheduled_variants(ap, args), command)
        return
    names = probe_configs(ap, args, CONFIGS)
    reuses = [r.strip() for r in args.reuse.split(",") if r.strip()]
    if not reuses or any(r not in REUSE for r in reuses):
        ap.error(f"--reuse: expected some of {', '.join(REUSE)}, got {args.reuse!r}")

    def held(keep, refresh, reuse):
        return lambda: HeldTiles(keep=keep, reuse=REUSE[reuse], refresh_every=refresh, warmup_steps=2)

    variants = [({"config": name, "reuse": reuse}, held(*CONFIGS[name], reuse), contextlib.nullcontext)
                for name in names for reuse in reuses]
    run_probe(args, variants, command)


def scheduled_variants(ap, args) -> list:
    """``run_probe`` variants of ScheduledTiles for each of ``--schedules`` x ``--forecast``."""
    try:
        schedules = [tuple(int(x) for x in sched.split(",")) for sched in args.schedules.split(";") if sched.strip()]
        forecasts = [(int(f.strip().rstrip("t")), "timestep" if f.strip().endswith("t") else "step")
                     for f in args.forecast.split(",") if f.strip()]
        tols = [None if t.strip() == "off" else float(t) for t in (args.refresh_above or "off").split(",") if t.strip()]
        layer_sets = [() if sel.strip() == "none" else tuple(int(i) for i in sel.split(","))
                      for sel in (args.dense_layers or "none").split(";") if sel.strip()]
        damps = [float(d) for d in args.damp.split(",") if d.strip()]
        corrections = [(float(c), int(p)) for c in args.correct.split(",") if c.strip()
                       for p in (args.pool.split(",") if float(c) else [str(TILE)]) if p.strip()]
        windows = [tuple(float(x) if "." in x else int(x) for x in w.split(",")) for w in args.window.split(";")
                   if w.strip()] or [None]
    except ValueError:
        ap.error(f"--schedules / --forecast / --refresh-above / --dense-layers / --damp / --window / --correct / "
                 f"--pool: expected e.g. '0,1,5,8', '0,1,1t,2t', 'off,0.1', '0;7', '0.5,1', '1,1,1;0.25,0.5,0.5', "
                 f"'0,1' and '128,32', got {args.schedules!r}, {args.forecast!r}, {args.refresh_above!r}, "
                 f"{args.dense_layers!r}, {args.damp!r}, {args.window!r}, {args.correct!r} and {args.pool!r}")
    variants = []
    grid = itertools.product(schedules, forecasts, tols, layer_sets, damps, windows, corrections)
    for sched, (order, clock), tol, layers, damp, window, (correct, pool) in grid:
        def make(sched=sched, order=order, clock=clock, tol=tol, layers=layers, damp=damp, window=window,
                 correct=correct, pool=pool):
            return ScheduledTiles(keep=args.keep, full_steps=sched, forecast=order, clock=clock, refresh_above=tol,
                                  dense_layers=layers, damp=damp, window=window, correct=correct, pool=pool,
                                  window_plus_keep=args.window_plus_keep)
        make()  # bad values fail before any generation
        label = {"full_steps": ",".join(map(str, sched)), "keep": args.keep, "forecast": order, "clock": clock,
                 **({"refresh_above": tol} if args.refresh_above else {}),
                 **({"dense_layers": ",".join(map(str, layers))} if args.dense_layers else {}),
                 **({"damp": damp} if args.damp != "1" else {}),
                 **({"window": list(window)} if window is not None else {}),
                 **({"window_plus_keep": True} if args.window_plus_keep and window is not None else {}),
                 **({"correct": correct, "pool": pool} if args.correct != "0" else {})}
        variants.append((label, make, contextlib.nullcontext))
    return variants


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
