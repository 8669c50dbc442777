"""The demo's strategies: what each named run hands to ``betakd train``.

A strategy is an entry of ``defaults.yaml``'s ``strategies`` catalogue::

    closed_form:
      label: Beta-KD closed form
      family: beta_kd            # baseline | sweep | beta_kd | reference (report grouping)
      recommended: false         # the documented recommendation (the report checks it)
      weighting: {name: closed_form, options: {...}}   # betakd train's weighting block;
                                                       # absent: CE only, no teacher channel
      kd_weight: 1.0             # fixed weightings: every KD channel's weight, in units of
                                 # the initial loss scales (scale_relative)
      sweep: [0.1, 0.3, 1, 3]    # a fixed sweep: one run per kd_weight, named <name>_x<w>
      feature: {adapter: teacher}   # changes to the demo's feature channel (null: drop it)

In ``weighting.options.trust.channels``, ``$logit`` and ``$feature`` name the demo's
logit and feature channels.

Everything is plain data, so ``--set strategies.closed_form.weighting.options.prior_rate_scale=0.25``
changes a strategy from the command line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from betakd.demo.config import DemoChannels, DemoConfig, DemoConfigError

FAMILIES = ("baseline", "sweep", "beta_kd", "reference")
STRATEGY_KEYS = {"label", "family", "recommended", "weighting", "kd_weight", "sweep", "feature"}


@dataclass(frozen=True)
class Strategy:
    name: str
    label: str
    family: str = "baseline"
    recommended: bool = False
    weighting: Mapping[str, Any] | None = None
    kd_weight: float | None = None
    feature: Mapping[str, Any] | None = field(default=None)
    feature_overridden: bool = False

    @property
    def uses_teacher(self) -> bool:
        return self.weighting is not None

    def channels(self, demo: DemoChannels) -> dict:
        """The ``channels`` block of ``betakd train`` for this strategy."""
        if not self.uses_teacher:
            return {"logits": [], "features": []}
        feature = self.feature_settings(demo)
        return {
            "logits": [{"energy": demo.logit_energy, "options": dict(demo.logit_options)}],
            "features": [dict(feature)] if feature else [],
        }

    def feature_settings(self, demo: DemoChannels) -> dict | None:
        """The demo's feature channel with this strategy's changes (``feature: null``
        drops it; without a demo feature channel there is nothing to change)."""
        if demo.feature is None or (self.feature_overridden and self.feature is None):
            return None
        return {**demo.feature, **(self.feature or {})}

    def weighting_block(self, demo: DemoChannels, learning_rate: float) -> dict:
        """The ``weighting`` block of ``betakd train`` for this strategy."""
        if not self.uses_teacher:
            return {"name": "equal"}
        block = {"learning_rate": learning_rate, **dict(self.weighting)}
        options = dict(block.get("options") or {})
        trust = options.get("trust")
        if isinstance(trust, Mapping) and trust.get("channels"):
            # `$logit` / `$feature` name the demo's channels, whatever energy --set picks.
            names = {"$logit": demo.logit_name, "$feature": (demo.feature or {}).get("name")}
            channels = [names.get(c, c) for c in trust["channels"]]
            options["trust"] = {**trust, "channels": channels}
        if self.kd_weight is not None:
            names = demo.names(self.feature_settings(demo))
            options["weights"] = {name: self.kd_weight for name in names}
            options.setdefault("scale_relative", True)
        block["options"] = options
        return block


def _parse(name: str, raw: Mapping[str, Any]) -> Strategy:
    if not isinstance(raw, Mapping):
        raise DemoConfigError(f"strategies.{name}: expected a mapping, got {raw!r}")
    unknown = sorted(set(raw) - STRATEGY_KEYS)
    if unknown:
        raise DemoConfigError(
            f"strategies.{name}: unknown keys {unknown}; expected some of {sorted(STRATEGY_KEYS)}"
        )
    family = raw.get("family", "baseline")
    if family not in FAMILIES:
        raise DemoConfigError(f"strategies.{name}.family must be one of {FAMILIES}, got {family!r}")
    kd_weight = raw.get("kd_weight")
    return Strategy(
        name=name,
        label=str(raw.get("label", name)),
        family=family,
        recommended=bool(raw.get("recommended", False)),
        weighting=raw.get("weighting"),
        kd_weight=None if kd_weight is None else float(kd_weight),
        feature=raw.get("feature"),
        feature_overridden="feature" in raw,
    )


def catalogue(config: DemoConfig) -> dict[str, Strategy]:
    """Every runnable strategy, sweeps expanded into one strategy per weight."""
    result: dict[str, Strategy] = {}
    for name, raw in config.strategies.items():
        sweep = raw.get("sweep") if isinstance(raw, Mapping) else None
        base = _parse(name, {k: v for k, v in raw.items() if k != "sweep"})
        if sweep is None:
            result[name] = base
            continue
        for weight in sweep:
            run = f"{name}_x{float(weight):g}"
            result[run] = Strategy(
                name=run,
                label=f"{base.label} x{float(weight):g}",
                family="sweep",
                weighting=base.weighting or {"name": "fixed"},
                kd_weight=float(weight),
                feature=base.feature,
                feature_overridden=base.feature_overridden,
            )
    return result


def select(config: DemoConfig, names: Sequence[str] | None) -> list[Strategy]:
    """The strategies named (a sweep's name selects all its runs; ``all``: everything;
    none: the config's ``run`` list), in catalogue order."""
    available = catalogue(config)
    wanted = list(names) if names else list(config.run)
    if wanted == ["all"]:
        return list(available.values())
    chosen: set[str] = set()
    for name in wanted:
        members = [n for n in available if n == name or n.startswith(f"{name}_x")]
        if not members:
            raise DemoConfigError(
                f"unknown strategy {name!r}; available: {', '.join(config.strategies)} (or all)"
            )
        chosen.update(members)
    return [s for n, s in available.items() if n in chosen]


def recommended(strategies: Sequence[Strategy]) -> Strategy | None:
    return next((s for s in strategies if s.recommended), None)
