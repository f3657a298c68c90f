"""``--check-stats`` and ``--recalibrate``: run a model on data, compare or re-estimate
every BN's moving statistics (the math is :mod:`bnfuse.stats`; imports no framework).

A backend supplies a *collector* (:mod:`bnfuse.onnx.stats`, :mod:`bnfuse.keras.stats`):
its ``sites`` (one :class:`Site` per BN it can run to), ``collect(model, names, feeds)``
(the :class:`~bnfuse.stats.Moments` of those BNs' inputs over the feeds, in inference
mode), ``with_stats(model, {name: (mean, var)})`` (a copy with new moving statistics)
and ``kernels(model, fold)`` (the weight arrays a fold changed, for the widening).

Recalibration runs in waves: a site's *depth* is one more than the deepest BN upstream of
it, and wave ``k`` collects the sites of depth ``k`` from the model whose shallower BNs
already have their new statistics, so every BN sees the inputs its recalibrated
predecessors produce. The data are streamed again for every wave.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnfuse.errors import UsageError
from bnfuse.result import BnStat, Fold, OutputShift, Recalibration, Refusal
from bnfuse.stats import FLAG_ORDER, WIDENING_LIMIT, Site, compare, max_scale, weight_flag, widening

__all__ = ["Outcome", "Site", "assemble", "checked_feeds", "run", "with_widening"]

Feeds = Callable[[], Iterable[Mapping[str, np.ndarray]]]

DISGUISE_NOTE = "BN in disguise (constant Mul/Add affine): no separate statistics"
UNREACHED_NOTE = "inside a subgraph, function or nested model: not run"


@dataclass
class Outcome:
    """What :func:`run` found: an entry per site, and the recalibrated model (or None)."""

    stats: list[BnStat]
    model: Any = None
    recalibration: Recalibration | None = None


def checked_feeds(feeds: Iterable[Mapping[str, np.ndarray]]) -> Iterator[Mapping[str, np.ndarray]]:
    """``feeds``, each refused (UsageError) when a float array holds NaN or Inf."""
    for feed in feeds:
        for name, arr in feed.items():
            a = np.asarray(arr)
            if a.dtype.kind in "fc" and not np.isfinite(a).all():
                raise UsageError(f"--inputs: array {name!r} holds NaN or Inf values")
        yield feed


def _counting(
    feeds: Iterable[Mapping[str, np.ndarray]], box: list[int]
) -> Iterator[Mapping[str, np.ndarray]]:
    """:func:`checked_feeds`, counting them in ``box[0]``."""
    for f in checked_feeds(feeds):
        box[0] += 1
        yield f


def _weights_only(site: Site) -> BnStat:
    if site.reason and (site.mean is None or site.var is None):
        return BnStat(
            site.name, "not-checked", channels=site.channels, scope=site.scope, note=site.reason
        )
    flag, note = weight_flag(site.mean, site.var, site.eps, site.gamma, site.beta)
    if site.reason:  # not run, but what its weights show is still worth saying
        flag, note = (
            ("not-checked", site.reason) if flag == "ok" else (flag, f"{note}; {site.reason}")
        )
    return BnStat(
        site.name,
        flag,
        max_scale=max_scale(site.var, site.eps, site.gamma),
        channels=site.channels,
        scope=site.scope,
        note=note,
    )


def _checked(site: Site, moments: Any, recalibrated: bool) -> BnStat:
    c = compare(moments, site.mean, site.var, site.eps, site.gamma, site.beta)
    note = c.note
    if recalibrated:
        note = "; ".join(x for x in ("recalibrated", note) if x)
    return BnStat(
        site.name,
        c.flag,
        mean_shift=c.mean_shift,
        var_ratio=c.var_ratio,
        max_scale=max_scale(site.var, site.eps, site.gamma),
        channels=site.channels,
        samples=int(moments.count),
        scope=site.scope,
        recalibrated=recalibrated,
        note=note,
    )


def run(
    collector: Any,
    model: Any,
    feeds: Feeds | None,
    *,
    recalibrate: bool = False,
    runner: Callable[[Any], Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Outcome:
    """Check (and with ``recalibrate`` re-estimate) every site of ``collector``.

    ``feeds()`` gives a fresh iterable of feeds each time (None: no data, weights only);
    ``runner(model)`` a backend runner, to measure how far recalibration moved the outputs.

    Raises:
        UsageError: bad data (NaN, too few values for a statistic), or ``recalibrate``
            without data.
    """
    sites: list[Site] = list(collector.sites)
    if not sites:
        return Outcome([])
    if feeds is None:
        if recalibrate:
            raise UsageError("--recalibrate needs data: give --inputs")
        return Outcome([_weights_only(s) for s in sites])
    good = [s for s in sites if not s.reason]
    out = {(s.name, s.scope): _weights_only(s) for s in sites if s.reason}
    if not recalibrate:
        if good:
            if progress:
                progress("collecting BN statistics")
            moments = collector.collect(model, [s.name for s in good], checked_feeds(feeds()))
            for s in good:
                out[s.name, s.scope] = _checked(s, moments[s.name], False)
        return Outcome([out[s.name, s.scope] for s in sites])
    current = model
    depths = sorted({s.depth for s in good})
    runs = 0
    for i, d in enumerate(depths):
        if progress:
            progress(f"recalibrating BN statistics (wave {i + 1}/{len(depths)})")
        wave = [s for s in good if s.depth == d]
        counted = [0]
        moments = collector.collect(current, [s.name for s in wave], _counting(feeds(), counted))
        runs = counted[0]
        new = {}
        for s in wave:
            out[s.name, s.scope] = _checked(s, moments[s.name], True)
            new[s.name] = (moments[s.name].mean, moments[s.name].var)
        current = collector.with_stats(current, new)
    shifts = output_shift(runner, model, current, feeds) if runner is not None and good else ()
    recal = Recalibration(tuple(s.name for s in good), len(depths), runs, tuple(shifts))
    return Outcome([out[s.name, s.scope] for s in sites], current, recal)


def output_shift(
    runner: Callable[[Any], Any], original: Any, recalibrated: Any, feeds: Feeds
) -> list[OutputShift]:
    """Max abs / rel difference and top-1 agreement of every output, recalibrated
    against original, over all feeds (float64)."""
    ro, rr = runner(original), runner(recalibrated)
    names = list(ro.output_names)
    max_abs = [0.0] * len(names)
    max_rel = [0.0] * len(names)
    agree = [0] * len(names)
    rows = [0] * len(names)
    for feed in checked_feeds(feeds()):
        for k, (a, b) in enumerate(zip(ro.run(feed), rr.run(feed), strict=True)):
            a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
            if a64.shape != b64.shape or a64.size == 0:
                max_abs[k] = max_rel[k] = math.inf
                continue
            diff = np.abs(a64 - b64)
            max_abs[k] = max(max_abs[k], float(np.max(diff)))
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.where(a64 != 0, diff / np.abs(a64), np.where(diff == 0, 0.0, np.inf))
            max_rel[k] = max(max_rel[k], float(np.max(rel)))
            if a64.ndim == 2 and a64.shape[1] > 1 and np.asarray(a).dtype.kind == "f":
                agree[k] += int(np.sum(np.argmax(a64, 1) == np.argmax(b64, 1)))
                rows[k] += a64.shape[0]
    return [
        OutputShift(n, max_abs[k], max_rel[k], agree[k] / rows[k] if rows[k] else None)
        for k, n in enumerate(names)
    ]


def _order(s: BnStat) -> tuple[int, float]:
    """Worst first: by flag, then by how far the data are from the statistics."""
    rank = FLAG_ORDER.index(s.flag) if s.flag in FLAG_ORDER else len(FLAG_ORDER)
    score = (s.mean_shift or 0.0) + math.log(max(s.var_ratio or 1.0, 1.0))
    return rank, -score if not math.isnan(score) else 0.0


def assemble(
    stats: Sequence[BnStat], folds: Sequence[Fold], refusals: Sequence[Refusal]
) -> tuple[BnStat, ...]:
    """Every normalization's entry, worst first: the sites' entries, plus BNs in
    disguise (no statistics) and BNs the collector could not run to (not checked)."""
    seen = {(s.bn, s.scope) for s in stats}
    extra: list[BnStat] = []
    items: list[Fold | Refusal] = [*folds, *refusals]
    for item in items:
        if (item.bn, item.scope) in seen:
            continue
        seen.add((item.bn, item.scope))
        disguise = item.kind != "BatchNormalization"
        extra.append(
            BnStat(
                item.bn,
                "no-stats" if disguise else "not-checked",
                channels=getattr(item, "channels", 0),
                kind=item.kind,
                scope=item.scope,
                note=DISGUISE_NOTE if disguise else UNREACHED_NOTE,
            )
        )
    return tuple(sorted([*stats, *extra], key=_order))


def with_widening(
    kernels: Callable[[Any, Fold], list[np.ndarray] | None],
    original: Any,
    fused: Any,
    folds: Sequence[Fold],
) -> tuple[list[Fold], list[str]]:
    """``folds`` with ``widening`` and ``scale_spread`` filled in, and a warning per fold
    over :data:`~bnfuse.stats.WIDENING_LIMIT`."""
    out: list[Fold] = []
    warnings: list[str] = []
    for f in folds:
        before, after = kernels(original, f), kernels(fused, f)
        if not before or not after or len(before) != len(after):
            out.append(f)
            continue
        if any(np.shape(a) != np.shape(b) for a, b in zip(before, after, strict=True)):
            out.append(f)
            continue
        changed = [(a, b) for a, b in zip(before, after, strict=True) if not np.array_equal(a, b)]
        if changed:  # a kernel the fold left alone (a separable layer's other) says nothing
            before, after = [a for a, _ in changed], [b for _, b in changed]
        ratio, spread = widening(before, after)
        out.append(_replace(f, widening=ratio, scale_spread=spread))
        worst = max(x for x in (ratio, spread, 0.0) if x is not None)
        if worst > WIDENING_LIMIT:
            warnings.append(
                f"fold of {f.bn!r} into {f.into!r} widens the weight range "
                f"(max|W'|/max|W| {_num(ratio)}, channel scale spread {_num(spread)}): "
                "per-tensor int8 quantization will lose precision"
            )
    return out, warnings


def _num(x: float | None) -> str:
    return "?" if x is None else f"{x:.3g}x"


def _replace(obj: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **changes)


@dataclass
class StatsCheck:
    """One ``--check-stats`` / ``--recalibrate`` run inside :func:`bnfuse.fuse`: made by
    :func:`check_model` before folding, :meth:`finish` after it."""

    outcome: Outcome
    kernels: Callable[[Any, Fold], list[np.ndarray] | None]
    folded: Any  # the model that is folded: the recalibrated one, or the original

    def finish(self, passed: Any) -> Any:
        """``passed`` (a PassResult) with each fold's widening filled in, and warnings
        for wide folds and flagged BNs."""
        folds, warnings = with_widening(self.kernels, self.folded, passed.model, passed.folds)
        passed.folds = folds
        flagged = [s for s in self.outcome.stats if s.flag not in ("ok", "not-checked")]
        if flagged:
            names = ", ".join(f"{s.bn} ({s.flag})" for s in flagged[:5])
            more = f" and {len(flagged) - 5} more" if len(flagged) > 5 else ""
            warnings.insert(0, f"BN statistics flagged: {names}{more}")
        passed.warnings = list(passed.warnings) + warnings
        return passed

    def entries(self, folds: Sequence[Fold], refusals: Sequence[Refusal]) -> tuple[BnStat, ...]:
        """Every BN's entry, worst first (see :func:`assemble`)."""
        return assemble(self.outcome.stats, folds, refusals)


def collector(backend: Any, model: Any) -> Any:
    """The backend's collector for ``model`` (imports the backend's stats module)."""
    if backend.name == "onnx":
        from bnfuse.onnx.stats import OnnxCollector

        return OnnxCollector(model)
    from bnfuse.keras.stats import KerasCollector

    return KerasCollector(model)


def check_model(
    backend: Any,
    model: Any,
    inputs: Any,
    *,
    recalibrate: bool,
    progress: Callable[[str], None] | None = None,
) -> StatsCheck:
    """Check (and with ``recalibrate`` re-estimate) ``model``'s BN statistics on
    ``inputs`` (a path, a list of paths, a directory of shards, a mapping or None)."""
    import bnfuse.inputs as _inputs

    if recalibrate and inputs is None:
        raise UsageError("--recalibrate needs data: give --inputs FILE.npz (or a directory)")
    col = collector(backend, model)
    feeds: Feeds | None = None
    if inputs is not None and col.sites:
        specs = list(backend.runner(model).inputs)
        _inputs.shards(inputs)  # a missing directory's shards: one clear line now

        def feeds() -> Iterable[Mapping[str, np.ndarray]]:
            return _inputs.iter_feeds(inputs, specs)

    outcome = run(
        col, model, feeds, recalibrate=recalibrate, runner=backend.runner, progress=progress
    )
    folded = outcome.model if outcome.model is not None else model
    return StatsCheck(outcome, col.kernels, folded)
