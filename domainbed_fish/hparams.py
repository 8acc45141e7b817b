"""Hyperparameters of the plugin's algorithms: search space and validation.

Each :class:`HParam` is a ``(default, random)`` pair in DomainBed's sense: the
default is what ``default_hparams`` returns, and ``sample`` draws the value of
``random_hparams`` from a ``numpy.random.RandomState`` that DomainBed seeds per
hyperparameter name (``misc.seed_hash(seed, name)``), so adding a name never
changes the values drawn for another.

Names DomainBed already defines (``lr``, ``weight_decay``, ``batch_size``, and
``meta_lr`` for Fish: default 0.5, search {0.05, 0.1, 0.5}) are not repeated here.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from domainbed_fish.optim import OPTIMIZERS

Sampler = Callable[[np.random.RandomState], Any]

#: Values of ``idgm_bound_metric``.
BOUND_METRICS = ("optimizer", "euclidean")

#: IDGM hyperparameters newer than saved runs and checkpoints, with the value that gives
#: those runs the behaviour they were trained with (so they load and resume unchanged).
IDGM_ADDED_LATER: dict[str, Any] = {"idgm_bound_metric": "euclidean", "idgm_gip_metric": "euclidean",
                                    "idgm_momentum": 0.9}


@dataclass(frozen=True)
class HParam:
    """One hyperparameter: its name, default, random-search distribution and meaning."""

    name: str
    default: Any
    sample: Sampler
    doc: str


def _fixed(value: Any) -> Sampler:
    return lambda r: value


EPSILON_CONVENTIONS = ("meta_lr", "meta_lr/meta_steps")

FISH_HPARAMS: tuple[HParam, ...] = (
    HParam("meta_steps", None, _fixed(None),
           "domains per outer step (distinct, sampled at random when fewer than all); "
           "None: every training domain, as DomainBed's built-in Fish"),
    HParam("fish_random_order", False, _fixed(False),
           "visit the domains in a new random order every outer step (what the paper's "
           "Theorem 3.1 assumes); False: environment order, as the built-in"),
    HParam("fish_inner_optimizer", "adam", _fixed("adam"),
           f"inner-loop optimizer, one of {OPTIMIZERS}"),
    HParam("fish_inner_momentum", 0.9, _fixed(0.9),
           "momentum of the inner optimizer: SGD's momentum, or Adam's β₁ (0.9 is "
           "DomainBed's Adam)"),
    HParam("fish_reload_inner_state", True, _fixed(True),
           "carry the inner optimizer's state over between outer steps (DomainBed, "
           "WILDS); False: a fresh inner optimizer every step (official CdSprites code)"),
    HParam("fish_epsilon", "meta_lr", _fixed("meta_lr"),
           "outer step size ε: 'meta_lr' (DomainBed) or 'meta_lr/meta_steps' (official "
           "WILDS code)"),
    HParam("fish_warmup_steps", 0, _fixed(0),
           "plain ERM steps before Fish starts (the official WILDS recipe's pretrain_iters), "
           "with an optimizer of fish_inner_optimizer's kind at lr, momentum/β₁ 0.9"),
    HParam("gip_every", 20, _fixed(20),
           "measure the gradient inner product at the weights before the step every this "
           "many steps, warm-up steps included (it costs one extra forward/backward per "
           "domain); 0: never"),
)

IDGM_HPARAMS: tuple[HParam, ...] = (
    HParam("idgm_gamma", 0.1, lambda r: float(10 ** r.uniform(-3, 0)),
           "γ, the weight of the gradient inner product in L_erm − γĜ"),
    HParam("idgm_penalty_bound", 0.5, lambda r: float(r.uniform(0.25, 0.9)),
           "ρ: the penalty's gradient is kept within ρ·‖Ḡ‖ by lowering γ for that step "
           "(γ_t = min(γ, ρ‖Ḡ‖/‖∇Ĝ‖)), so with ρ < 1 this step's gradient is a descent "
           "direction of L_erm (to first order; momentum carries earlier steps on); "
           "inf: a fixed γ, the unbounded objective"),
    HParam("idgm_bound_metric", "optimizer", _fixed("optimizer"),
           "norms of the bound: 'optimizer' measures Ḡ and ∇Ĝ in the metric of the step the "
           "optimizer takes (Adam's 1/(√v̂ + eps) per coordinate), so that step's own part "
           "descends L_erm; "
           "'euclidean': plain norms, which only SGD's step respects"),
    HParam("idgm_gip_metric", "euclidean", _fixed("euclidean"),
           "inner product of Ĝ: 'euclidean', the paper's G_i·G_j; 'optimizer', G_iᵀWG_j in the "
           "metric W of the optimizer's step (Adam's 1/(√v̂ + eps), held constant), the "
           "alignment Fish with an inner Adam rewards (idgm.metric_gip); SGD: the same as 'euclidean'"),
    HParam("idgm_penalty_anneal_iters", 500, lambda r: int(10 ** r.uniform(0, 4)),
           "steps of plain ERM (γ = 0) before the penalty switches on, with an optimizer "
           "reset at the switch, as DomainBed's IRM and VREx"),
    HParam("idgm_optimizer", "adam", _fixed("adam"),
           f"optimizer, one of {OPTIMIZERS}"),
    HParam("idgm_momentum", 0.9, _fixed(0.9),
           "momentum of the optimizer: SGD's momentum, or Adam's β₁ (0.9 is DomainBed's Adam)"),
)


# --------------------------------------------------------------------------- validation


#: Spellings of an infinite ``idgm_penalty_bound`` that JSON can carry.
NO_BOUND = ("inf", "Infinity")


def _bad(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(
        f"hyperparameter {name!r} = {value!r} is invalid: allowed {allowed}. "
        f"Fix it in --hparams (e.g. --hparams '{{\"{name}\": ...}}')."
    )


def _number(hparams: Mapping[str, Any], name: str) -> float:
    value = hparams[name]
    # numbers.Real takes NumPy's scalars too (a hyperparameter computed with NumPy).
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise _bad(name, value, "a number")
    return float(value)


def _integer(hparams: Mapping[str, Any], name: str, low: int) -> int:
    value = hparams[name]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise _bad(name, value, f"an integer >= {low}")
    return int(value)


def _boolean(hparams: Mapping[str, Any], name: str) -> bool:
    value = hparams[name]
    if not isinstance(value, (bool, np.bool_)):
        raise _bad(name, value, "true or false")
    return bool(value)


def _choice(hparams: Mapping[str, Any], name: str, choices: tuple[str, ...]) -> str:
    value = hparams[name]
    if value not in choices:
        raise _bad(name, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


#: How close (difflib's ratio) an unknown name must be to one of an algorithm's own names
#: without its prefix (``meta_steps``) to be refused as a typo of it.
LOOKALIKE_CUTOFF = 0.8


def refuse_unknown_prefixed(hparams: Mapping[str, Any], known: list[str], prefix: str, owner: str = "") -> None:
    """Raise ``ValueError`` for a name ``prefix…`` of ``hparams`` not in ``known``, naming the
    nearest (``owner`` starts the message): DomainBed's train script passes a mistyped name
    through unread, so the run would silently use the default."""
    for name in sorted(n for n in hparams if isinstance(n, str) and n.startswith(prefix) and n not in known):
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"{owner}unknown hyperparameter {name!r}: {hint}the {prefix}… ones are {known}. "
                         "Fix it in --hparams.")


def _require(hparams: Mapping[str, Any], specs: tuple[HParam, ...], extra: tuple[str, ...], prefix: str) -> None:
    """Every hyperparameter of ``specs`` and ``extra`` present, and no unknown one named
    ``prefix…`` or spelled nearly as one of ``specs``' names without the prefix
    (``meta_step``, ``gip_evry``): DomainBed passes a mistyped name through unread, so it
    would silently train with the default.  Other unknown names are let through: one ``--hparams`` string
    is often shared by a sweep's algorithms."""
    known = [s.name for s in specs]
    missing = [n for n in (*extra, *known) if n not in hparams]
    if missing:
        raise ValueError(
            f"missing hyperparameters {missing}: build them with DomainBed's "
            "hparams_registry.default_hparams / random_hparams, which know them once "
            "domainbed_fish is installed (or domainbed_fish.register() was called)."
        )
    refuse_unknown_prefixed(hparams, known, prefix)
    unprefixed = [n for n in known if not n.startswith(prefix)]
    for name in sorted(n for n in hparams if isinstance(n, str) and n not in known and n not in extra):
        # No registered name of any algorithm or dataset is this close to one of these
        # (tests/test_domainbed_plugin.py checks), so a match is a typo.
        close = difflib.get_close_matches(name, unprefixed, n=1, cutoff=LOOKALIKE_CUTOFF)
        if close:
            raise ValueError(f"unknown hyperparameter {name!r}: did you mean {close[0]!r}? "
                             "Fix it in --hparams.")


@dataclass(frozen=True)
class FishConfig:
    """Validated Fish settings (see :data:`FISH_HPARAMS` for their meaning)."""

    lr: float
    weight_decay: float
    meta_lr: float
    meta_steps: int | None
    random_order: bool
    inner_optimizer: str
    inner_momentum: float
    reload_inner_state: bool
    epsilon: str
    warmup_steps: int
    gip_every: int

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any], num_domains: int) -> FishConfig:
        """Validate DomainBed-style ``hparams``; raise ``ValueError`` naming the culprit."""
        _require(hparams, FISH_HPARAMS, ("lr", "weight_decay", "meta_lr"), prefix="fish_")
        meta_lr = _number(hparams, "meta_lr")
        if not 0.0 < meta_lr <= 1.0:
            raise _bad("meta_lr", hparams["meta_lr"], "0 < meta_lr <= 1")
        meta_steps = hparams["meta_steps"]
        if meta_steps is not None:
            meta_steps = _integer(hparams, "meta_steps", 1)
            if meta_steps > num_domains:
                raise _bad("meta_steps", meta_steps,
                           f"1 <= meta_steps <= {num_domains} (the number of training "
                           "domains), or null for all of them")
        lr = _number(hparams, "lr")
        if not 0 < lr < math.inf:
            raise _bad("lr", hparams["lr"], "a finite lr > 0")
        weight_decay = _number(hparams, "weight_decay")
        if not 0 <= weight_decay < math.inf:
            raise _bad("weight_decay", hparams["weight_decay"], "a finite weight_decay >= 0")
        momentum = _number(hparams, "fish_inner_momentum")
        if not 0.0 <= momentum < 1.0:
            raise _bad("fish_inner_momentum", hparams["fish_inner_momentum"], "0 <= momentum < 1")
        return cls(
            lr=lr,
            weight_decay=weight_decay,
            meta_lr=meta_lr,
            meta_steps=meta_steps,
            random_order=_boolean(hparams, "fish_random_order"),
            inner_optimizer=_choice(hparams, "fish_inner_optimizer", OPTIMIZERS),
            inner_momentum=momentum,
            reload_inner_state=_boolean(hparams, "fish_reload_inner_state"),
            epsilon=_choice(hparams, "fish_epsilon", EPSILON_CONVENTIONS),
            warmup_steps=_integer(hparams, "fish_warmup_steps", 0),
            gip_every=_integer(hparams, "gip_every", 0),
        )


@dataclass(frozen=True)
class IDGMConfig:
    """Validated IDGM settings (see :data:`IDGM_HPARAMS` for their meaning)."""

    lr: float
    weight_decay: float
    gamma: float
    penalty_bound: float
    penalty_anneal_iters: int
    optimizer: str
    bound_metric: str = "optimizer"
    gip_metric: str = "euclidean"
    momentum: float = 0.9

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> IDGMConfig:
        """Validate DomainBed-style ``hparams``; raise ``ValueError`` naming the culprit."""
        hparams = {**IDGM_ADDED_LATER, **hparams}
        _require(hparams, IDGM_HPARAMS, ("lr", "weight_decay"), prefix="idgm_")
        gamma = _number(hparams, "idgm_gamma")
        if gamma < 0 or math.isinf(gamma):
            raise _bad("idgm_gamma", hparams["idgm_gamma"], "a finite idgm_gamma >= 0")
        # JSON has no infinity: "inf" is accepted besides Python's json extension Infinity.
        bound_value = hparams["idgm_penalty_bound"]
        bound_allowed = 'a number idgm_penalty_bound > 0, or "inf" for no bound'
        try:
            bound = math.inf if bound_value in NO_BOUND else _number(hparams, "idgm_penalty_bound")
        except ValueError:
            raise _bad("idgm_penalty_bound", bound_value, bound_allowed) from None
        if not bound > 0:
            raise _bad("idgm_penalty_bound", bound_value, bound_allowed)
        lr = _number(hparams, "lr")
        if not 0 < lr < math.inf:
            raise _bad("lr", hparams["lr"], "a finite lr > 0")
        weight_decay = _number(hparams, "weight_decay")
        if not 0 <= weight_decay < math.inf:
            raise _bad("weight_decay", hparams["weight_decay"], "a finite weight_decay >= 0")
        momentum = _number(hparams, "idgm_momentum")
        if not 0.0 <= momentum < 1.0:
            raise _bad("idgm_momentum", hparams["idgm_momentum"], "0 <= momentum < 1")
        return cls(
            lr=lr,
            weight_decay=weight_decay,
            gamma=gamma,
            penalty_bound=bound,
            penalty_anneal_iters=_integer(hparams, "idgm_penalty_anneal_iters", 0),
            optimizer=_choice(hparams, "idgm_optimizer", OPTIMIZERS),
            bound_metric=_choice(hparams, "idgm_bound_metric", BOUND_METRICS),
            gip_metric=_choice(hparams, "idgm_gip_metric", BOUND_METRICS),
            momentum=momentum,
        )


# --------------------------------------------------------------------------- datasets

#: The plugin's datasets get DomainBed's small-image treatment (``lr``,
#: ``weight_decay``, ``batch_size`` and every algorithm's small-image values), as
#: computed for this DomainBed dataset, before their own entries below apply.
SMALL_IMAGES_BASE = "Debug28"

CDSPRITES_HPARAMS: tuple[HParam, ...] = (
    HParam("batch_size", 32, lambda r: int(2 ** r.uniform(3, 6)),
           "images per training domain per step (DomainBed's small-image search, capped at 64 for a CPU)"),
    HParam("cdsprites_per_domain", 2000, _fixed(2000),
           "sprites per environment (training domains and the decorrelated one)"),
    HParam("cdsprites_data_seed", 0, _fixed(0),
           "seed of the sprites and palettes; the same for every trial, like a downloaded dataset"),
)

#: Settings of the plugin's algorithms that differ on CdSprites: 1,001 steps leave no
#: room for IDGM's DomainBed-style warm-up, and the bounded penalty does not need one.
#: Fish keeps DomainBed's environment order: a random order (the paper's CdSprites code,
#: Theorem 3.1) left CdSprites-15 at chance after 250 steps through DomainBed's train
#: script (48%, 50%, 49% over 3 seeds, against 77%, 52%, 52% in environment order;
#: docs/reproduction/findings.md, "Domain order").  Fish starts with 50 ERM steps (the
#: official code's ``pretrain_iters``): without them N = 30 inner Adam steps per outer step
#: left two of three seeds at the constant predictor (50%, 51%, 98% at step 250; with them
#: 98.8%, 98.6%, 97.4%).
CDSPRITES_ALGORITHM_HPARAMS: dict[str, tuple[HParam, ...]] = {
    "Fish": (
        HParam("fish_warmup_steps", 50, lambda r: int(r.choice([0, 50, 100])),
               "plain ERM steps before Fish starts (random: 0, 50 or 100)"),
    ),
    "IDGM": (
        HParam("idgm_penalty_anneal_iters", 0, lambda r: int(10 ** r.uniform(0, 2)),
               "penalty from the first step (random: up to 100 ERM steps first)"),
    ),
}

LINEAR_TOY_HPARAMS: tuple[HParam, ...] = (
    HParam("linear_model", True, _fixed(True),
           "one zero-initialised linear layer on the raw inputs (DomainBed's featurizer "
           "selection, extended by the plugin)"),
    HParam("toy_per_domain", 1000, _fixed(1000), "examples per domain"),
    HParam("batch_size", 100, _fixed(100),
           "examples per domain per step (an eighth of a domain's in-split: DomainBed's loader "
           "assembles batches item by item, and whole-split batches made the toy slow)"),
    HParam("lr", 0.01, lambda r: float(10 ** r.uniform(-3, -1)), "learning rate"),
)

#: Settings of the plugin's algorithms that differ on the linear toy: the paper's
#: linear example (Figures 1 and 2) uses inner SGD with a random domain order.
LINEAR_TOY_ALGORITHM_HPARAMS: dict[str, tuple[HParam, ...]] = {
    "Fish": (
        HParam("fish_inner_optimizer", "sgd", _fixed("sgd"), "inner SGD, as in the paper's toy"),
        HParam("fish_inner_momentum", 0.0, _fixed(0.0), "plain SGD"),
        HParam("fish_random_order", True, _fixed(True), "random domain order (Theorem 3.1)"),
        HParam("meta_lr", 0.1, lambda r: float(r.choice([0.05, 0.1, 0.5])), "ε"),
    ),
    # Fish's outer step is ε·α·S = 0.1 · 0.01 · 2 = 0.002 in SGD units; IDGM gets the
    # same step (SGD with momentum 0.9: 0.0002 / (1 − 0.9)), so the two compare at
    # equal speed on a problem whose outcome depends on how far training has gone.
    "IDGM": (
        HParam("idgm_optimizer", "sgd", _fixed("sgd"), "SGD (momentum 0.9), like Fish's inner SGD"),
        HParam("lr", 0.0002, lambda r: float(10 ** r.uniform(-4, -3)), "learning rate"),
        HParam("idgm_gamma", 1.0, lambda r: float(10 ** r.uniform(-1, 1)), "γ"),
        HParam("idgm_penalty_anneal_iters", 0, _fixed(0), "penalty from the first step"),
    ),
}
