"""Sparse attention over tile-aligned video tokens: `Neighborhood` (static 3D windows) and
`TemporalSparse` (the tiles the kernel finds light at one denoising step are skipped at the next), both
by default with an estimate of the tiles they skip.

Both lay the video tokens of a self- or joint-attention call out in 3D tiles
(`dit_accel.kernels.tile_order`) and run the block-sparse kernel (`dit_accel.kernels.block_sparse`:
Triton on CUDA, its PyTorch twin elsewhere) over that order; the kernel reads q, k, v and writes
the output in the model's order through the layout's index, so nothing is copied. Text tokens of joint
attention stay dense as queries and as keys; cross-attention, text-only attention, calls whose
grid is unknown and calls with a mask that hides keys run dense (each reason logged once).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields

import torch

from ..kernels.block_sparse import block_sparse_attention, blocks_to_mask, tiles_to_blocks
from ..kernels.next_layout import next_blocks, next_mask
from ..kernels.tile_order import TileOrder, tile_order, window_tiles
from ..layout import AttentionCall
from . import estimate as _est
from .base import AttentionMethod
from .dense import Dense

logger = logging.getLogger("dit_accel")


AUTO = "auto"  # TemporalSparse: the default of the mode (with or without the estimate)


def _full_layout(n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every key tile for every query tile: (blocks ``[1, 1, n, n]``, counts ``[1, 1, n]``), int32,
    broadcast over batch and heads."""
    blocks = torch.arange(n, dtype=torch.int32, device=device).repeat(1, 1, n, 1)
    return blocks, torch.full((1, 1, n), n, dtype=torch.int32, device=device)


def _fits(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` more fit on ``device`` leaving a tenth of it (at least 1 GiB) free; True off CUDA."""
    if device.type != "cuda":
        return True
    free, total = torch.cuda.mem_get_info(device)
    return free - nbytes >= max(total // 10, 2**30)


def kernel_pass(query, key, value, order: TileOrder, blocks, counts):
    """(output, log-sum-exp in model order) of one kernel pass over the tiles of (blocks, counts)."""
    out, lse = block_sparse_attention(query, key, value, blocks, counts, tile_len=order.tile_len,
                                      seq_index=order.index, return_lse=True)
    return out, order.scatter(lse)


def _tokens(order: TileOrder) -> int:
    """Tokens of the call in the model's order (what ``order.tile_len`` sums to), known on the host."""
    return math.prod(order.grid) + order.text


def _triple_or_none(value, name: str):
    if value is None:
        return None
    if isinstance(value, int):
        value = (value,) * 3
    value = tuple(value)
    if len(value) != 3 or any(not isinstance(v, int) or v < 1 for v in value):
        raise ValueError(f"{name}: expected an int or three positive ints (t, h, w), got {value!r}")
    return value


@dataclass
class _TiledSparse(AttentionMethod):
    """Shared machinery: geometry, dense fallbacks, density accounting.

    Subclasses define the fields `tile`, `dense_steps` and `dense_layers` and call
    `_check_common()` from `__post_init__`.
    """

    _dense: Dense = field(default_factory=Dense, init=False, repr=False, compare=False)
    _logged: set = field(default_factory=set, init=False, repr=False, compare=False)
    # computed / total token pairs of the sparse calls since reset_stats(), counted on the host
    _pairs: list = field(default_factory=lambda: [0, 0], init=False, repr=False, compare=False)
    # computed pairs a kernel adds up on the device (float64, one element), or None
    _pairs_sum: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {"method": type(self).__name__, **{f.name: getattr(self, f.name) for f in fields(self) if f.init}}

    def _once(self, key: str, message: str, *args) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.info(message, *args)

    def density(self) -> float | None:
        """Fraction of (query, key) token pairs computed in the video self/joint-attention calls since
        `reset_stats()` (`dense_steps` / `dense_layers` count as computed in full; cross-attention and
        dense fallbacks are not counted), or `None` before any."""
        done, total = self._pairs
        if self._pairs_sum is not None:
            done = done + self._pairs_sum.item()
        return None if not total else float(done) / total

    def reset_stats(self) -> None:
        self._pairs = [0, 0]
        self._pairs_sum = None

    def _pairs_total(self, device) -> torch.Tensor:
        """The device total that kernels add computed pairs to (created on first use; moved to the
        host count if the device changes)."""
        if self._pairs_sum is not None and self._pairs_sum.device != torch.device(device):
            self._pairs[0] = self._pairs[0] + self._pairs_sum.item()
            self._pairs_sum = None
        if self._pairs_sum is None:
            self._pairs_sum = torch.zeros(1, dtype=torch.float64, device=device)
        return self._pairs_sum

    def _check_common(self) -> None:
        name = type(self).__name__
        self.tile = _triple_or_none(self.tile, f"{name}(tile)")
        self.dense_layers = tuple(int(i) for i in self.dense_layers)
        if self.dense_steps < 0:
            raise ValueError(f"{name}(dense_steps={self.dense_steps}): must be >= 0")

    def _count(self, row_pairs: float, order: TileOrder, rows: int) -> None:
        """Add one call of `rows` (batch x heads) attention rows that each computed `row_pairs` pairs."""
        self._pairs = [self._pairs[0] + rows * row_pairs, self._pairs[1] + rows * _tokens(order) ** 2]

    def _count_full(self, order: TileOrder, rows: int) -> None:
        """Add one call that computes every pair (dense steps and layers, full passes)."""
        self._count(_tokens(order) ** 2, order, rows)

    def _order(self, query, key, attn_mask, call: AttentionCall | None) -> TileOrder | None:
        """The tiled order of this call, or None when it must run dense."""
        if call is None:
            self._once("no-call", "dit_accel %s: called without an AttentionCall; running dense", type(self).__name__)
            return None
        kind = call.module.kind
        if kind not in ("self", "joint"):
            return None  # cross / text attention is dense by design
        grid = call.layout.grid
        S = query.shape[2]
        text, text_first = 0, False
        if kind == "joint" and call.text_span is not None:
            start, stop = call.text_span
            text, text_first = stop - start, start == 0
            if not (start == 0 or stop == S):
                grid = None
        if grid is None or math.prod(grid) + text != S or key.shape[2] != S:
            self._once(f"grid-{call.layout.family}", "dit_accel %s: %s attention of %d tokens does not match the "
                       "video grid %s (+%d text); running those calls dense", type(self).__name__,
                       call.layout.family, S, grid, text)
            return None
        if attn_mask is not None:
            hides = ~attn_mask.all() if attn_mask.dtype == torch.bool else (attn_mask != 0).any()
            if bool(hides):
                self._once("mask", "dit_accel %s: an attention mask hides some keys (padded text); the block-sparse "
                           "kernel takes no masks, so those calls run dense", type(self).__name__)
                return None
        return tile_order(grid, self.tile, text, text_first, query.device, packed=self.packed)

    def _dense_step(self, order: TileOrder, call: AttentionCall, query) -> bool:
        """Whether this (tileable) call is one of `dense_steps` / `dense_layers`; such calls count as
        density 1 in `density()`."""
        if call.layout.step_index < self.dense_steps or call.module.layer in self.dense_layers:
            self._count_full(order, query.shape[0] * query.shape[1])
            return True
        return False

    # -- the estimate of skipped tiles (subclasses with the fields estimate, full_steps, full_every, correct)

    def _check_estimate(self) -> None:
        """Check the estimate's fields and find the last of the leading full steps (0, 1, ...), where the
        forecast starts."""
        name = type(self).__name__
        if not isinstance(self.estimate, bool):
            raise ValueError(f"{name}(estimate={self.estimate!r}): expected True or False")
        steps = tuple(self.full_steps)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps):
            raise ValueError(f"{name}(full_steps={self.full_steps!r}): expected denoising step indices (ints >= 0), "
                             "e.g. (0, 1, 2, 5)")
        self.full_steps = tuple(sorted(set(steps)))
        if isinstance(self.full_every, bool) or not isinstance(self.full_every, int) or self.full_every < 0:
            raise ValueError(f"{name}(full_every={self.full_every!r}): expected an int >= 0 (0: no full passes after "
                             "full_steps)")
        if not self.correct >= 0:
            raise ValueError(f"{name}(correct={self.correct!r}): expected a factor >= 0 (0: no correction)")
        self._warmup = 0
        while self._warmup + 1 in self.full_steps:
            self._warmup += 1

    def _full_step(self, step: int) -> bool:
        last = self.full_steps[-1] if self.full_steps else 0
        return step in self.full_steps or (self.full_every > 0 and step > last and (step - last) % self.full_every == 0)

    def _estimated(self, query, key, value, attn_mask, call: AttentionCall, order: TileOrder, row_pairs: float,
                   blocks, counts, outside):
        """One call with the estimate, given the tiles computed exactly between full passes
        (``blocks``, ``counts``, ``row_pairs`` token pairs per attention row) and ``outside``: (summary
        pairs per row, blocks and counts of the skipped tiles, their `summary_mask`, whether some rows
        skip nothing). Steps before the last leading full step run dense (nothing to remember yet); a
        full pass computes both parts and remembers the skipped one; a sparse pass merges the exact
        part with the forecast of the skipped one, corrected by the summary tokens."""
        state, step = call.state, call.layout.step_index
        rows = query.shape[0] * query.shape[1]
        if state.get("no_room") or step < self._warmup:
            self._count_full(order, rows)
            return self._dense(query, key, value, attn_mask, call)
        inside = kernel_pass(query, key, value, order, blocks, counts)
        if self._full_step(step) or "history" not in state:
            self._count_full(order, rows)
            rest = kernel_pass(query, key, value, order, *outside[1:3])
            self._remember(state, rest, query, key, value, order, outside, step)
            return _est.merge_into(*inside, *rest)
        self._count(row_pairs, order, rows)
        history = state["history"]
        out, lse = history[-1][:2]
        if len(history) == 2:  # the line through the last two full passes
            (o1, l1, t1), (o2, l2, t2) = history
            w = 1.0 + (step - t2) / (t2 - t1)
            out, lse = torch.lerp(o1, o2, w), torch.lerp(l1, l2, w)
            if outside[4]:
                lse = torch.where(torch.isfinite(l2), lse, l2)
        if self.correct:  # the forecast of (outside - correct x summary), plus correct x the summary now
            now_out, now_lse = self._summary(query, key, value, order, outside)
            out, lse = torch.add(out, now_out, alpha=self.correct), lse + self.correct * now_lse
        return _est.merge_into(*inside, out, lse)

    def _summary(self, query, key, value, order, outside):
        """The summary tokens' part (output, log-sum-exp) in model order, counted in density."""
        self._pairs[0] += outside[0] * query.shape[0] * query.shape[1]
        return _est.summary_part(query, key, value, order, outside[3])

    def _remember(self, state, rest, query, key, value, order, outside, step) -> None:
        """Keep a full pass's skipped part (minus `correct` x its summary part) for the forecast: the
        last two passes, in the query's dtype. The first time per layer and branch, check that CUDA
        memory holds them; where it does not, that layer and branch run dense from now on."""
        out, lse = rest
        need = 2 * (out.numel() * out.element_size() + lse.numel() * lse.element_size())
        if "history" not in state and not _fits(need, query.device):
            state["no_room"] = True
            self._once("no-room", "dit_accel %s(estimate=True): the forecast needs %.2f GB per layer and CFG branch "
                       "and %s is short of memory; layers that do not fit run dense attention (slower). Pass "
                       "estimate=False to skip tiles without the estimate, or free memory (e.g. "
                       "enable_model_cpu_offload).", type(self).__name__, need / 2**30, query.device)
            return
        if self.correct:
            s_out, s_lse = self._summary(query, key, value, order, outside)
            out, lse = torch.add(out, s_out, alpha=-self.correct), lse - self.correct * s_lse
        if outside[4]:  # rows that skip nothing (text queries): no part outside, output 0
            ok = torch.isfinite(rest[1])
            out, lse = torch.where(ok[..., None], out, 0.0), torch.where(ok, lse, float("-inf"))
        state["history"] = [*state.get("history", [])[-1:], (out, lse, step)]


@dataclass
class Neighborhood(_TiledSparse):
    """Static 3D neighborhood attention over the video grid (tile-granular, as Sliding Tile Attention),
    by default with an estimate of the key tiles outside the window.

    With `estimate` (the default), every tile is computed at the steps of `full_steps` and then every
    `full_every` steps; in between, each query attends exactly to its window and merges (through the
    log-sum-exp) an estimate of the tiles outside it: their part of the output and log-sum-exp,
    forecast linearly (in the step index) from the last two full passes, corrected by `correct`
    times how far one summary token per skipped tile (its mean key and value) has moved from its own
    forecast. The leading full steps (0, 1, 2) are warm-up: the forecast starts from the last of them,
    and the ones before it run dense attention. On the ShapesBench reference model (20 steps) the
    defaults compute 37.6% of the attention pairs and give 29.5 dB PSNR / SSIM 0.91 against dense
    (README, "What sparsity costs"). Memory: two attention outputs and log-sum-exps per layer and CFG
    branch (5.7 GB measured for Wan2.1-1.3B at 480p in bf16 without CFG, twice that with it); where
    CUDA memory runs short, the layers that do not fit run dense (logged once).

    Args:
        window: `(t, h, w)` window per query, in tokens after patching (frames, rows, columns), or
            fractions in (0, 1] of the grid's axes; rounded up to whole 3D tiles and shifted inward
            at the grid's edges so every query sees the same number of tiles. A window larger than
            the grid is an error; one equal to it is dense attention. Default: `(1, 1, 1)` (each
            query's own 3D tile) with `estimate`, else `(0.5, 0.5, 0.5)`.
        stride: `(t, h, w)` in tiles: neighboring query tiles sharing one window (GNA's strided
            windows); 1 = a window per tile.
        tile: `(t, h, w)` tokens per 3D tile (product <= 128); `None` picks one per grid.
        dense_steps: the first denoising steps run dense.
        dense_layers: transformer blocks (by index) that always run dense.
        packed: fill kernel tiles with video tokens without padding (`kernels.tile_order`); a window
            then covers the kernel tiles its 3D tiles touch, more tiles than padded 3D tiles need, so
            off by default.
        estimate: estimate the tiles outside the window (above); `False`: the window alone.
        full_steps / full_every: with `estimate`, the steps that compute every tile: those listed,
            then every `full_every` steps after the last of them (0: none after).
        correct: with `estimate`, the factor on the summary tokens' correction (0: the forecast alone).
    """

    window: tuple | None = None
    stride: int | tuple = 1
    tile: tuple | None = None
    dense_steps: int = 0
    dense_layers: tuple = ()
    packed: bool = False
    estimate: bool = True
    full_steps: tuple = (0, 1, 2, 5)
    full_every: int = 4
    correct: float = 1.0
    # (id(order), device) -> (pairs per attention row, kv_blocks, kv_counts, order, outside): one per
    # geometry; outside (with the estimate): (summary pairs per row, kv_blocks, kv_counts of the tiles
    # outside the window, the summary tokens' score bias, whether some rows skip nothing)
    _layouts: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check_estimate()
        if self.window is None:
            self.window = (1, 1, 1) if self.estimate else (0.5, 0.5, 0.5)
        window = (self.window,) * 3 if isinstance(self.window, int | float) else tuple(self.window)
        if len(window) != 3 or any(isinstance(w, bool) or not isinstance(w, int | float) or w <= 0 for w in window):
            raise ValueError(f"Neighborhood(window={self.window!r}): expected (t, h, w) of positive token counts or "
                             "fractions in (0, 1]")
        if any(isinstance(w, float) and w > 1 for w in window):
            raise ValueError(f"Neighborhood(window={self.window!r}): a float is a fraction of the grid and must be "
                             "<= 1; give tokens as ints")
        self.window = window
        self.stride = _triple_or_none(self.stride, "Neighborhood(stride)")
        self._check_common()

    def window_tokens(self, grid) -> tuple[int, int, int]:
        """The window in tokens for `grid` (fractions resolved, rounded up)."""
        return tuple(int(w) if isinstance(w, int) else max(1, math.ceil(w * g)) for w, g in zip(self.window, grid))

    def _geometry(self, order: TileOrder):
        """(token pairs per attention row, kv_blocks, kv_counts, order, outside) for `order`, built once
        per geometry (on the host: no per-call counting on the device); see `_layouts`."""
        key = (id(order), str(order.index.device))
        if key not in self._layouts:
            tiles = window_tiles(order, self.window_tokens(order.grid), self.stride)[None, None]
            blocks, counts = tiles_to_blocks(tiles)
            device = order.index.device
            lens = order.tile_len.cpu().double()
            row_pairs = float(torch.einsum("bhqk,q,k->", tiles.double(), lens, lens))
            outside = None
            if self.estimate and not tiles.all():  # one summary token per (query, skipped non-empty tile)
                summary_pairs = float(torch.einsum("bhqk,q,k->", (~tiles).double(), lens, (lens > 0).double()))
                some_full = bool(tiles[0, 0].all(-1).any())  # rows that skip nothing (text queries)
                outside = (summary_pairs, *(t.to(device) for t in tiles_to_blocks(~tiles)),
                           _est.summary_mask(order, tiles.to(device)), some_full)
            # order pins id()
            self._layouts[key] = (row_pairs, blocks.to(device), counts.to(device), order, outside)
        return self._layouts[key]

    def __call__(self, query, key, value, attn_mask, call: AttentionCall | None = None):
        order = self._order(query, key, attn_mask, call)
        if order is None or self._dense_step(order, call, query):
            return self._dense(query, key, value, attn_mask, call)
        row_pairs, blocks, counts, _, outside = self._geometry(order)
        if outside is None:  # the window alone (or it covers the grid)
            self._count(row_pairs, order, query.shape[0] * query.shape[1])
            return block_sparse_attention(query, key, value, blocks, counts, tile_len=order.tile_len,
                                          seq_index=order.index)
        return self._estimated(query, key, value, attn_mask, call, order, row_pairs, blocks, counts, outside)


@dataclass
class TemporalSparse(_TiledSparse):
    """Skip the key tiles the kernel found negligible at an earlier denoising step (LiteAttention's
    idea), by default estimating what the skipped tiles add.

    Every pass the kernel runs also reports, per visited key tile, the largest weight it gave any
    query relative to that query's running maximum (with the estimate: to its log-sum-exp at the
    step before), its gap, with no extra profiling pass; the skip set is kept per layer, CFG branch
    and shape, reset per generation.

    With `estimate` (the default), every tile is computed at the steps of `full_steps` and then every
    `full_every` steps, as in `Neighborhood`. At the last of the leading full steps (0, 1, 2; the
    ones before it run dense) the kernel's gaps choose, per batch, head and query tile, the key tiles
    computed exactly from then on: the query tile's own tile (the diagonal) and the highest-gap tiles
    at or above `threshold`, at least `min_density` and at most `max_density` of them. Between full
    passes each query attends exactly to those tiles and merges (through the log-sum-exp) an estimate
    of the rest: their part of the output and log-sum-exp, forecast linearly from the last two full
    passes, corrected by `correct` times how far one summary token per skipped tile (its mean key and
    value) has moved from its own forecast. On the ShapesBench reference model (20 steps) the defaults
    compute 39.5% of the attention pairs and give 30.0 dB PSNR / SSIM 0.92 against dense (README,
    "What sparsity costs"). Memory: as `Neighborhood`'s (5.9 GB measured for Wan2.1-1.3B at 480p
    without CFG); where CUDA memory runs short, the layers that do not fit run dense (logged once).

    With `estimate=False`, tiles below `2**threshold` are dropped at the next step, after
    `warmup_steps` dense ones; `refresh_every` and `refresh_tol` bring dropped tiles back.

    Args:
        threshold: log2 ratio; a key tile is negligible when every query of the query tile weighs it
            below `2**threshold` of its row maximum (with the estimate: gives each of its keys an
            attention probability below `2**threshold`, against the previous step's log-sum-exp).
            `-inf`: nothing is negligible (dense, with the default `max_density`).
        warmup_steps: without the estimate, the first denoising steps run every tile (and record the
            first skip set); `"auto"`: 2.
        refresh_every: without the estimate, every this many steps after warm-up one step runs every
            tile again and recomputes the skip set, bringing back wrongly skipped tiles (0: never);
            `"auto"`: 5.
        refresh_tol: without the estimate, error-triggered refresh: when the mean drop of the rows'
            log-sum-exp against the last full step exceeds this (nats), the next step runs every tile
            (`None`: off); `"auto"`: 0.1. Decided on the device, without a host sync.
        min_density / max_density: per query tile, at least / at most this fraction of key tiles is
            kept (the highest-gap ones; with the estimate, the own tile besides them). `"auto"`: 0.05
            / 1 without the estimate; 0 / 0.025 with it (1 when `threshold` is `-inf`).
        tile: `(t, h, w)` tokens per 3D tile; `None` picks one per grid.
        dense_steps / dense_layers: steps and blocks that always run dense.
        packed: fill kernel tiles with video tokens in 3D-tile order without padding
            (`kernels.tile_order`): no work on padding slots where the 3D tiles do not divide the grid.
        estimate: estimate the skipped tiles (above); `False`: drop them.
        full_steps / full_every: with `estimate`, the steps that compute every tile: those listed,
            then every `full_every` steps after the last of them (0: none after).
        correct: with `estimate`, the factor on the summary tokens' correction (0: the forecast alone).
    """

    threshold: float = -10.0
    warmup_steps: int | str | None = AUTO
    refresh_every: int | str | None = AUTO
    refresh_tol: float | str | None = AUTO
    min_density: float | str = AUTO
    max_density: float | str = AUTO
    tile: tuple | None = None
    dense_steps: int = 0
    dense_layers: tuple = ()
    packed: bool = True
    estimate: bool = True
    full_steps: tuple = (0, 1, 2, 5)
    full_every: int = 4
    correct: float = 1.0

    def __post_init__(self) -> None:
        self._check_estimate()
        if self.estimate:  # these three belong to skip-and-drop; None (as to_dict gives them) is accepted
            for name in ("warmup_steps", "refresh_every", "refresh_tol"):
                if getattr(self, name) not in (AUTO, None):
                    raise ValueError(f"TemporalSparse({name}={getattr(self, name)!r}): applies without the estimate; "
                                     "pass estimate=False, or set full_steps / full_every for the full passes")
                setattr(self, name, None)
        defaults = dict(warmup_steps=2, refresh_every=5, refresh_tol=0.1, min_density=0.05, max_density=1.0)
        if self.estimate:
            defaults.update(min_density=0.0, max_density=1.0 if self.threshold == float("-inf") else 0.025)
        for name, value in defaults.items():
            if getattr(self, name) == AUTO:
                setattr(self, name, value)
        numbers = ("min_density", "max_density", "refresh_tol") + (() if self.estimate else ("warmup_steps",
                                                                                              "refresh_every"))
        for name in numbers:
            value = getattr(self, name)
            off = value is None and name == "refresh_tol"
            if isinstance(value, bool) or not (isinstance(value, int | float) or off):
                raise ValueError(f"TemporalSparse({name}={value!r}): expected a number, or 'auto' for the default of "
                                 "the mode")
        if not 0.0 <= self.min_density <= self.max_density <= 1.0:
            raise ValueError(f"TemporalSparse(min_density={self.min_density}, max_density={self.max_density}): need "
                             "0 <= min_density <= max_density <= 1")
        if self.max_density <= 0:
            raise ValueError("TemporalSparse(max_density): must be > 0")
        if not self.estimate:
            for name in ("warmup_steps", "refresh_every"):
                if getattr(self, name) < 0:
                    raise ValueError(f"TemporalSparse({name}={getattr(self, name)}): must be >= 0")
            if self.refresh_tol is not None and self.refresh_tol <= 0:
                raise ValueError(f"TemporalSparse(refresh_tol={self.refresh_tol}): must be > 0, or None to turn it "
                                 "off")
        self._check_common()

    def _bounds(self, n: int) -> tuple[int, int]:
        """(k_min, k_max): the density floor and ceiling in key tiles of ``n``."""
        return max(1, math.ceil(self.min_density * n)), max(1, math.ceil(self.max_density * n))

    def __call__(self, query, key, value, attn_mask, call: AttentionCall | None = None):
        order = self._order(query, key, attn_mask, call)
        if order is None or self._dense_step(order, call, query):
            return self._dense(query, key, value, attn_mask, call)
        if self.estimate:
            return self._estimate_call(query, key, value, attn_mask, call, order)
        B, H = query.shape[:2]
        n = order.tile_len.numel()
        state = call.state
        step = call.layout.step_index
        since = step - self.warmup_steps
        full_now = (step < self.warmup_steps or "blocks" not in state
                    or (self.refresh_every > 0 and since > 0 and since % self.refresh_every == 0))
        if "full" not in state:  # state is per layer, branch and shape: built once
            state["full"] = _full_layout(n, query.device)
        full = state["full"]
        blocks, counts = full if full_now else (state["blocks"], state["counts"])
        if full_now:
            self._count_full(order, B * H)
        out, gap = self._attend(query, key, value, order, state, blocks, counts, full_now)
        self._update(state, gap, blocks, counts, order, full_now, B * H)
        return out

    def _estimate_call(self, query, key, value, attn_mask, call: AttentionCall, order: TileOrder):
        """A call with the estimate. The step before the last leading full step runs the kernel over
        every tile and keeps its LSE; the next call computes every tile in one kernel pass whose gaps
        are measured against that LSE, chooses the exact tiles from them (`_choose`) and keeps the
        skipped tiles' part for the forecast; the later ones are `_estimated` calls."""
        state, step = call.state, call.layout.step_index
        rows = query.shape[0] * query.shape[1]
        if state.get("no_room") or step < self._warmup:
            self._count_full(order, rows)
            if step == self._warmup - 1 and not state.get("no_room"):
                out, state["ref_lse"] = self._full_pass(query, key, value, order, return_lse=True)
                return out
            return self._dense(query, key, value, attn_mask, call)
        if "chosen" not in state:
            self._count_full(order, rows)
            ref = state.pop("ref_lse", None)
            if ref is None:  # no pass before this one: its own LSE first (the same pairs again, not recounted)
                ref = self._full_pass(query, key, value, order, return_lse=True)[1]
            out, gap = self._full_pass(query, key, value, order, return_gap=True, gap_ref=ref)
            state["chosen"] = self._choose(gap, order)
            outside = state["chosen"][3]
            if outside is not None:
                rest = kernel_pass(query, key, value, order, *outside[1:3])
                self._remember(state, rest, query, key, value, order, outside, step)
            return out
        row_pairs, blocks, counts, outside = state["chosen"]
        if outside is None:  # nothing skipped: every tile, exactly
            self._count_full(order, rows)
            return block_sparse_attention(query, key, value, blocks, counts, tile_len=order.tile_len,
                                          seq_index=order.index)
        return self._estimated(query, key, value, attn_mask, call, order, row_pairs, blocks, counts, outside)

    @staticmethod
    def _full_pass(query, key, value, order: TileOrder, **extras):
        """The kernel over every tile of ``order`` with ``extras`` (LSE, gap; in tiled order)."""
        return block_sparse_attention(query, key, value, *_full_layout(order.tile_len.numel(), query.device),
                                      tile_len=order.tile_len, seq_index=order.index, **extras)

    def _choose(self, gap, order: TileOrder):
        """(pairs per attention row, blocks, counts, outside) of the tiles computed exactly between full
        passes, from the gaps of a pass over every tile (visiting order = tile order) measured against
        the rows' LSE: per (batch, head, query tile) its own tile and the highest-gap other tiles within
        the threshold, floor and ceiling (`next_mask`; text tiles and rows keep every tile);
        ``outside`` as `_estimated` takes it, None when nothing is skipped. One host sync (the pair
        counts), once per layer, CFG branch and generation."""
        n = order.tile_len.numel()
        k_min, k_max = self._bounds(n)
        gap.diagonal(dim1=-2, dim2=-1).fill_(float("-inf"))  # the own tile is kept anyway: rank the others
        kept = next_mask(gap, *_full_layout(n, gap.device), n_k=n, threshold=self.threshold, k_min=k_min,
                         k_max=k_max, text_tile=order.video_tiles if order.text else None)
        kept |= torch.eye(n, dtype=torch.bool, device=kept.device)
        lens = order.tile_len.to(kept.device).double()
        per_row = kept.shape[0] * kept.shape[1]
        row_pairs = float(torch.einsum("bhqk,q,k->", kept.double(), lens, lens)) / per_row
        blocks, counts = tiles_to_blocks(kept, n)
        if kept.all():
            return row_pairs, blocks, counts, None
        summary_pairs = float(torch.einsum("bhqk,q,k->", (~kept).double(), lens, (lens > 0).double())) / per_row
        some_full = bool(kept.all(-1).any())  # rows that skip nothing (text queries)
        return (row_pairs, blocks, counts,
                (summary_pairs, *tiles_to_blocks(~kept, n), _est.summary_mask(order, kept), some_full))

    def _checks_error(self, state: dict, full_now: bool) -> bool:
        """Whether this sparse pass measures its LSE drop against the last full pass."""
        return self.refresh_tol is not None and not full_now and "lse" in state

    def _attend(self, query, key, value, order: TileOrder, state: dict, blocks, counts, full_now: bool):
        """The kernel call: (output, gaps). A full pass also keeps its LSE as the error check's
        reference; a sparse pass adds its rows' LSE drop against it into ``state["drop"]`` (zero: see
        ``_update``) inside the kernel (``lse_drop``), with no LSE output and no reduction launch."""
        keep_lse = self.refresh_tol is not None and full_now
        drop = None
        if self._checks_error(state, full_now):
            if "drop" not in state:
                state["drop"] = torch.zeros(1, dtype=torch.float64, device=query.device)
            drop = (state["lse"], state["drop"])
        res = block_sparse_attention(query, key, value, blocks, counts, tile_len=order.tile_len,
                                     seq_index=order.index, return_lse=keep_lse, return_gap=True, lse_drop=drop)
        if keep_lse:
            state["lse"] = res[1]
        return res[0], res[-1]

    def _update(self, state: dict, gap, blocks, counts, order: TileOrder, full_now: bool, rows: int) -> None:
        """After a pass, in one kernel launch: the next step's layout from the gaps (the visited tiles
        at or above the threshold, within the density floor and ceiling, exact counts as equal gaps
        rank by visiting order, text tiles always), the error-triggered refresh (every tile next time
        when the rows' LSE dropped by more than ``refresh_tol`` on average: the attention kernel
        summed the drop) and the pairs this pass computed, added to a device total; then the drop's
        total is zeroed for the next call. These two launches are the method's whole per-call
        bookkeeping, timed in benchmarks/sparse.py."""
        n = order.tile_len.numel()
        check = self._checks_error(state, full_now)
        k_min, k_max = self._bounds(n)
        nxt = next_blocks(gap, blocks, counts, n_k=n, threshold=self.threshold, k_min=k_min, k_max=k_max,
                          text_tile=order.video_tiles if order.text else None,
                          refresh=state["drop"] if check else None,
                          refresh_above=self.refresh_tol * state["lse"].numel() if check else None,
                          tile_len=None if full_now else order.tile_len,
                          pairs_sum=None if full_now else self._pairs_total(gap.device),
                          pairs_scale=rows // (gap.shape[0] * gap.shape[1]))
        state["blocks"], state["counts"] = nxt.blocks, nxt.counts
        if check:
            state["drop"].zero_()
        if not full_now:  # the computed pairs went to the device total (no host sync)
            self._pairs = [self._pairs[0], self._pairs[1] + rows * _tokens(order) ** 2]

    def tile_mask(self, state: dict, n: int) -> torch.Tensor:
        """The bool ``[B, H, n, n]`` tile mask of the layout ``state`` holds for the next step."""
        return blocks_to_mask(state["blocks"], state["counts"], n, n, 1, 1)
