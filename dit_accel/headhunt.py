"""HeadHunter: greedy search for the attention heads whose SoftPAG guidance best serves an objective.

As in "Fine-Grained Perturbation Guidance via Attention Head Selection": start from no heads; in
every round, generate the search prompts once per remaining candidate head with SoftPAG perturbing
the heads chosen so far plus that candidate, score the generations with the objective, and add the
``top_k`` best candidates. The search stops after ``rounds`` rounds, or earlier when no candidate
improves the objective by more than ``min_gain``.

    from dit_accel.guidance import headhunt
    result = headhunt(pipe, prompts, seeds, objective="checker", rounds=3, top_k=1,
                      cache_dir="runs/hh", output="presets/checker.json")
    pipe_handle = dit_accel.apply(pipe, guidance=SoftPAG(preset="presets/checker.json"))

Every scored head set is written to ``cache_dir`` (one JSON line each, atomically), so an
interrupted search rerun with the same settings recomputes nothing it finished; a cache written
with other settings is refused. Under ``accelerate launch`` the candidates of every round are
sharded across the processes (each writes its own ``scores.rank<R>.jsonl``) and every process
then picks the same heads from the union. The preset JSON holds the heads, ``u``, ``s``, the
objective, every round's scores and the per-head effect map (round one's single-head scores minus
the no-guidance score, layer x head) that the UI draws as a heatmap.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger("dit_accel.headhunt")

Head = tuple[int, int]
SETTINGS = "search.json"


def _key(heads) -> str:
    return ",".join(f"{layer}.{head}" for layer, head in sorted(heads)) or "none"


def _heads_dict(heads) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for layer, head in sorted(heads):
        out.setdefault(str(layer), []).append(head)
    return out


def perturbable_heads(pipe) -> dict[int, int]:
    """``{layer: number of heads}`` of the layers SoftPAG can perturb (self or joint attention)."""
    from .adapters import adapter_for
    from .apply import _perturbable_layers, _transformers_of

    _, transformers = _transformers_of(pipe)
    t = transformers[0]
    return {layer: n for layer, (_, n) in sorted(_perturbable_layers(t, adapter_for(t)).items())}


@dataclass
class HeadHuntResult:
    """What a search found; :meth:`preset` is what ``SoftPAG(preset=...)`` and the UI load."""

    heads: list[Head]
    score: float
    baseline: float
    rounds: list[dict]
    effect_map: dict
    settings: dict
    evaluations: int
    seconds: float = 0.0
    stopped: str = ""
    scores: dict[str, float] = field(default_factory=dict)

    def preset(self) -> dict:
        s = self.settings
        return {
            "guidance": "SoftPAG", "heads": _heads_dict(self.heads), "strength": s["strength"], "scale": s["scale"],
            "rows": s["rows"], "objective": s["objective"], "score": self.score, "baseline_score": self.baseline,
            "search": {"rounds": len(self.rounds), "top_k": s["top_k"], "stopped": self.stopped,
                       "evaluations": self.evaluations, "seconds": round(self.seconds, 1), "pipeline": s["pipeline"],
                       "pipeline_kwargs": s["pipeline_kwargs"], "prompts": len(s["prompts"]), "seeds": s["seeds"],
                       "attention": s["attention"]},
            "rounds": self.rounds, "effect_map": self.effect_map,
        }

    def save(self, path) -> Path:
        from .files import atomic_write

        path = Path(path)
        atomic_write(path, json.dumps(self.preset(), indent=1) + "\n")
        return path


class _Cache:
    """Scores of head sets: in memory, and on disk when a folder is given."""

    def __init__(self, folder: Path | None, rank: int, world: int) -> None:
        self.folder = folder
        self.path = None if folder is None else folder / ("scores.jsonl" if world == 1 else f"scores.rank{rank}.jsonl")
        self.mine: list[dict] = []
        self.entries: dict[str, dict] = {}
        self.reload()
        if self.path is not None and self.path.exists():
            self.mine = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]

    def reload(self) -> None:
        if self.folder is None:
            return
        for path in sorted(self.folder.glob("scores*.jsonl")):
            for line in path.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry

    def add(self, entry: dict) -> None:
        self.entries[entry["key"]] = entry
        if self.path is not None:
            from .evals.runner import _write_rows

            self.mine.append(entry)
            _write_rows(self.path, self.mine)


def _check_settings(folder: Path, settings: dict, rank: int) -> None:
    from .files import atomic_write

    path = folder / SETTINGS
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise ValueError(f"cache_dir={str(folder)!r}: it holds a search with other settings ({', '.join(diff)}); "
                             "use another folder to keep both, or delete it to start over")
    elif rank == 0:
        atomic_write(path, json.dumps(settings, indent=1) + "\n")


def _generate(pipe, prompts, seeds, kwargs: dict, batch_size: int, guidance=None, attention=None) -> list[np.ndarray]:
    """Generations of ``prompts`` (one seed each, ``batch_size`` per call) as frames rounded to 8
    bits, with ``guidance`` (a SoftPAG) and ``attention`` installed for the duration."""
    import dit_accel

    from .evals.metrics import to_frames

    handle = dit_accel.apply(pipe, attention=attention, guidance=guidance) if (guidance or attention) else None
    device = torch.device(getattr(pipe, "_execution_device", "cpu"))
    videos = []
    try:
        for i in range(0, len(prompts), batch_size):
            gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds[i:i + batch_size]]
            out = pipe(prompt=list(prompts[i:i + batch_size]), generator=gens, output_type="np", **kwargs)
            batch = out.frames if hasattr(out, "frames") else out.images
            videos += [np.round(to_frames(np.asarray(v)) * 255) / 255 for v in batch]
    finally:
        if handle is not None:
            handle.remove()
    return videos


def _validate(prompts, seeds, rounds, top_k, strength, scale, rows, batch_size, min_gain):
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("prompts: expected a non-empty list of non-empty strings")
    seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != len(prompts):
        raise ValueError(f"seeds: got {len(seeds)} seeds for {len(prompts)} prompts (one per prompt, or None)")
    for name, value in (("rounds", rounds), ("top_k", top_k), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r}: must be an integer >= 1")
    if not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"strength={strength}: u must be in (0, 1] (0 perturbs nothing)")
    if float(scale) <= 0:
        raise ValueError(f"scale={scale}: the SoftPAG scale s must be > 0 for a search")
    if rows not in ("image", "all"):
        raise ValueError(f"rows={rows!r}: expected 'image' or 'all'")
    return seeds


def _candidates(available: dict[int, int], candidates) -> list[Head]:
    if candidates is None:
        return [(layer, h) for layer, n in available.items() for h in range(n)]
    out = []
    for c in candidates:
        try:
            layer, head = (int(x) for x in c)
        except (TypeError, ValueError):
            raise ValueError(f"candidates: {c!r} is not a (layer, head) pair") from None
        if layer not in available or not 0 <= head < available[layer]:
            raise ValueError(f"candidates: ({layer}, {head}) is not a perturbable head of this model; layers with self "
                             f"or joint attention and their head counts: {available}")
        out.append((layer, head))
    if not out:
        raise ValueError("candidates: empty; pass None to search every head")
    return sorted(set(out))


def headhunt(pipe, prompts: Sequence[str], seeds: Sequence[int] | None = None, objective="checker",
             rounds: int = 3, top_k: int = 1, strength: float = 1.0, scale: float = 3.0, rows: str = "image",
             candidates: Sequence[Head] | None = None, attention=None, cache_dir=None, output=None,
             batch_size: int = 8, min_gain: float = 0.0, progress: bool = True, **pipeline_kwargs) -> HeadHuntResult:
    """Greedy HeadHunter search (see the module docstring).

    Args:
        pipe: a diffusers pipeline of a supported family (its attention is restored afterwards).
        prompts, seeds: the search prompts and one generation seed each (default ``0, 1, ...``).
        objective: a name or spec from :mod:`dit_accel.evals.objectives` (``"checker"``,
            ``"sharpness"``, ``"contrast"``, ``"colorfulness"``, ``"clip:PATH"``, ...) or a callable
            ``(videos, prompts) -> scores`` (higher is better).
        rounds, top_k: greedy rounds, and heads added per round.
        strength, scale, rows: the SoftPAG ``u``, ``s`` and rows used while searching.
        candidates: the (layer, head) pairs to consider (default: every head of every self/joint layer).
        attention: an attention method to search under (default: the pipeline's own attention).
        cache_dir: folder of the per-set scores (resumable); ``None`` keeps them in memory only.
        output: where to save the preset JSON (atomically).
        batch_size: prompts per pipeline call.
        min_gain: a round must improve the objective by more than this, or the search stops (a
            negative value keeps adding heads for ``rounds`` rounds; the best set on the path wins).
        **pipeline_kwargs: passed to every pipeline call (``num_inference_steps``, ``guidance_scale``,
            ``height``, ``width``, ``num_frames``, ...).
    """

    from .evals.objectives import check_objective, load_objective, objective_name
    from .evals.runner import _barrier, _shard
    from .guidance import SoftPAG

    seeds = _validate(prompts, seeds, rounds, top_k, strength, scale, rows, batch_size, min_gain)
    check_objective(objective)
    layers = perturbable_heads(pipe)
    pool = _candidates(layers, candidates)
    rank, world = _shard()
    settings = json.loads(json.dumps({
        "pipeline": type(pipe).__name__, "transformer": dict(getattr(pipe.transformer, "config", {})),
        "prompts": list(prompts), "seeds": seeds, "objective": objective_name(objective), "strength": float(strength),
        "scale": float(scale), "rows": rows, "top_k": top_k, "pipeline_kwargs": pipeline_kwargs,
        "attention": attention.to_dict() if hasattr(attention, "to_dict") else None}, default=str))
    folder = None if cache_dir is None else Path(cache_dir)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        _check_settings(folder, settings, rank)
    _barrier(world)
    cache = _Cache(folder, rank, world)
    score_fn = None
    saved_bar = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    started = time.perf_counter()

    def evaluate(heads: tuple[Head, ...]) -> None:
        nonlocal score_fn
        if score_fn is None:
            score_fn = load_objective(objective)
        t0 = time.perf_counter()
        pag = SoftPAG(heads=_heads_dict(heads), strength=strength, scale=scale, rows=rows) if heads else None
        videos = _generate(pipe, prompts, seeds, pipeline_kwargs, batch_size, guidance=pag, attention=attention)
        scores = [float(x) for x in score_fn(videos, list(prompts))]
        if len(scores) != len(prompts):
            raise ValueError(f"objective {objective_name(objective)}: returned {len(scores)} scores for "
                             f"{len(prompts)} videos")
        cache.add({"key": _key(heads), "heads": [list(h) for h in sorted(heads)], "mean": float(np.mean(scores)),
                   "scores": scores, "seconds": round(time.perf_counter() - t0, 3)})

    def run_sets(sets: list[tuple[Head, ...]], desc: str) -> dict[str, float]:
        todo = [s for i, s in enumerate(sets) if i % world == rank and _key(s) not in cache.entries]
        if progress and todo:
            from tqdm.auto import tqdm

            bar = tqdm(todo, desc=desc + (f" [{rank}/{world}]" if world > 1 else ""), leave=False)
        else:
            bar = todo
        for s in bar:
            evaluate(s)
        _barrier(world)
        cache.reload()
        missing = [_key(s) for s in sets if _key(s) not in cache.entries]
        if missing:
            raise RuntimeError(f"headhunt: no scores for head sets {missing[:5]} after this phase (a process failed?)")
        return {_key(s): cache.entries[_key(s)]["mean"] for s in sets}

    try:
        baseline = run_sets([()], "headhunt baseline")["none"]
        selected: tuple[Head, ...] = ()
        current = baseline
        history: list[dict] = []
        best_set, best = selected, baseline
        stopped = f"ran {rounds} rounds"
        for r in range(1, rounds + 1):
            pending = [c for c in pool if c not in selected]
            if not pending:
                stopped = f"round {r}: no candidates left"
                break
            sets = [tuple(sorted((*selected, c))) for c in pending]
            means = run_sets(sets, f"headhunt round {r}/{rounds}")
            ranked = sorted(zip(pending, sets), key=lambda cs: (-means[_key(cs[1])], cs[0]))
            added = [c for c, _ in ranked[:top_k]]
            entry = {"round": r, "base": [list(h) for h in selected], "base_score": current,
                     "scores": {f"{c[0]}.{c[1]}": means[_key(s)] for c, s in zip(pending, sets)}}
            if means[_key(ranked[0][1])] <= current + min_gain:
                entry["added"] = []
                history.append(entry)
                stopped = f"round {r}: no candidate improved the objective by more than {min_gain}"
                break
            selected = tuple(sorted((*selected, *added)))
            current = run_sets([selected], f"headhunt round {r} set")[_key(selected)] if top_k > 1 else means[
                _key(ranked[0][1])]
            entry.update(added=[list(c) for c in added], score=current)
            history.append(entry)
            if current > best:
                best_set, best = selected, current
    finally:
        pipe.set_progress_bar_config(**saved_bar)
    if not best_set:
        logger.warning("headhunt: no head set beat the unguided score %.4f on these prompts", baseline)
    first = history[0]["scores"] if history else {}
    values = [[(first[f"{layer}.{h}"] - baseline) if f"{layer}.{h}" in first else None for h in range(n)]
              for layer, n in layers.items()]
    effect = {"layers": list(layers), "heads": max(layers.values()), "values": values, "baseline": baseline,
              "objective": settings["objective"], "meaning": "round-1 score with this head perturbed minus the "
                                                              "unguided score"}
    result = HeadHuntResult(heads=list(best_set), score=best, baseline=baseline, rounds=history, effect_map=effect,
                            settings=settings, evaluations=len(cache.entries), seconds=time.perf_counter() - started,
                            stopped=stopped, scores={k: v["mean"] for k, v in cache.entries.items()})
    if output is not None and rank == 0:
        result.save(output)
    _barrier(world)
    return result


__all__ = ["HeadHuntResult", "headhunt", "perturbable_heads"]
