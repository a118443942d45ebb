"""The pass API: Pass, PassResult, Rule / RuleSet, PassManager and the name registry.

A pass declares a contract: what it requires and provides (facts recorded on the graph,
e.g. "calibrated"), and how it treats numerics:
    EXACT     - float outputs unchanged up to fp32 rounding (tested at rtol=atol=1e-5);
    TOLERANT  - float outputs unchanged up to a stated, tested bound;
    NUMERICS  - changes numerics by design (quantization).
"""
from __future__ import annotations

import importlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import torch.fx as fx

from .errors import PassError, QCError
from .ir import Graph, eliminate_dead_code, verify

EXACT, TOLERANT, NUMERICS = "exact", "tolerant", "numerics"


def _snake(name: str) -> str:
    out = []
    for i, c in enumerate(name):
        if c.isupper() and i and not name[i - 1].isupper():
            out.append("_")
        out.append(c.lower())
    return "".join(out)



@dataclass
class PassResult:
    graph: Graph
    changed: bool
    stats: dict[str, int] = field(default_factory=dict)
    declined: list[str] = field(default_factory=list)  # "node: reason" for each declined match


@dataclass
class PassContext:
    """What passes may need besides the graph: the config and calibration data."""

    config: Any = None
    calib: Any = None  # qcompiler.calib.CalibData
    log: list = field(default_factory=list)


class Pass:
    """Base class. Subclasses set `name`, the contract fields, and implement `run`."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    numerics: ClassVar[str] = EXACT

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __call__(self, graph: Graph, ctx: PassContext | None = None) -> PassResult:
        return self.run(graph, ctx or PassContext())

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if not cls.name:
            cls.name = _snake(cls.__name__)


class Rule:
    """A pattern rewrite. The docstring states the math.

    `match(node)` returns a dict of named nodes when `node` roots the pattern, else None;
    `check(graph, m)` returns a reason string to decline, or None;
    `rewrite(graph, m)` edits the graph in place.
    """

    def match(self, node: fx.Node) -> dict[str, fx.Node] | None:
        raise NotImplementedError

    def check(self, graph: Graph, m: dict[str, fx.Node]) -> str | None:
        return None

    def rewrite(self, graph: Graph, m: dict[str, fx.Node]) -> None:
        raise NotImplementedError

    @property
    def name(self) -> str:
        return type(self).__name__


class RuleSet(Pass):
    """A pass made of rules, applied to every node in graph order until none fires."""

    rules: ClassVar[tuple[type[Rule], ...]] = ()
    max_rounds: ClassVar[int] = 8

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats: Counter = Counter()
        declined: list[str] = []
        rules = [r() for r in self.rules]
        for _ in range(self.max_rounds):
            fired = False
            for node in list(graph.nodes):
                if node.graph is not graph.graph:  # erased by an earlier rewrite this round
                    continue
                for rule in rules:
                    m = rule.match(node)
                    if m is None:
                        continue
                    reason = rule.check(graph, m)
                    if reason:
                        msg = f"{node.name}: {rule.name}: {reason}"
                        if msg not in declined:
                            declined.append(msg)
                            stats[f"declined_{rule.name}"] += 1
                        continue
                    rule.rewrite(graph, m)
                    stats[rule.name] += 1
                    fired = True
                    break
            if not fired:
                break
        changed = any(v for k, v in stats.items() if not k.startswith("declined_"))
        if changed:
            eliminate_dead_code(graph)
            graph.recompile()
        return PassResult(graph, changed, dict(stats), declined)


# -- registry -------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass nameable from Config and the CLI."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass name '{cls.name}' is already registered by {_REGISTRY[cls.name].__module__}")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[Pass]]:
    _load_builtin()
    return dict(_REGISTRY)


def resolve(spec: str | type[Pass] | Pass) -> Pass:
    """A pass from a registered name, 'module:Class', a Pass subclass or instance."""
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, type) and issubclass(spec, Pass):
        return spec()
    _load_builtin()
    if ":" in spec:
        mod, _, cls_name = spec.partition(":")
        try:
            cls = getattr(importlib.import_module(mod), cls_name)
        except (ImportError, AttributeError) as e:
            raise QCError(f"cannot load pass '{spec}': {e}") from None
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise QCError(f"'{spec}' is not a qcompiler Pass subclass")
        return cls()
    if spec not in _REGISTRY:
        raise QCError(f"unknown pass '{spec}' (registered: {', '.join(sorted(_REGISTRY))}; or give module:Class)")
    return _REGISTRY[spec]()


def _load_builtin() -> None:
    importlib.import_module("qcompiler.passes")


class PassManager:
    """Runs passes in order; checks each pass's requirements, records what it provides,
    verifies the graph after each pass when `verify_each` is set."""

    def __init__(self, passes: Iterable[str | Pass | type[Pass]], *, verify_each: bool = False,
                 progress: Callable[[str], None] | None = None):
        self.passes = [resolve(p) for p in passes]
        self.verify_each = verify_each
        self.progress = progress
        self.record: list[dict] = []

    def run(self, graph: Graph, ctx: PassContext | None = None) -> Graph:
        ctx = ctx or PassContext()
        facts: set[str] = set(graph.meta.get("facts", []))
        done: list[str] = []
        for p in self.passes:
            missing = [r for r in p.requires if r not in facts]
            if missing:
                raise PassError(f"pass '{p.name}' requires {missing}, which no earlier pass provided "
                                f"(passes run: {done or 'none'})")
            if self.progress:
                self.progress(p.name)
            try:
                res = p.run(graph, ctx)
                if self.verify_each:
                    verify(res.graph)
            except QCError as e:
                raise PassError(f"pass '{p.name}' failed after [{', '.join(done) or 'no passes'}]: {e}") from None
            except Exception as e:
                raise PassError(f"pass '{p.name}' failed after [{', '.join(done) or 'no passes'}]: "
                                f"{type(e).__name__}: {e}") from e
            graph = res.graph
            facts.update(p.provides)
            graph.meta["facts"] = sorted(facts)
            self.record.append({"pass": p.name, "numerics": p.numerics, "changed": res.changed,
                                "stats": dict(sorted(res.stats.items())), "declined": list(res.declined)})
            done.append(p.name)
        return graph

