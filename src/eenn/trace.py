"""Cut any ``nn.Module`` into consecutive segments at named ``torch.fx`` nodes and attach exits.

A cut in a non-sequential graph can leave more than one value alive: the input of a residual
add that spans the cut, say. Each segment therefore returns the cut node's value first (that is
what the exit head reads) followed by every other value a later segment still needs, and the
next segment takes them all. Values that do not depend on the input (parameters read with
``get_attr``, constants) are recomputed in every segment that uses them instead of carried.
"""
from __future__ import annotations

import difflib
import operator
from typing import Any, Sequence

from torch import Tensor, fx, nn

from .backbones.base import Backbone, dry_run
from .heads import resolve_head_options
from .network import _REBUILDERS, MultiExitNetwork, _per_exit

__all__ = ["attach_exits", "TraceError"]


class TraceError(ValueError):
    """A model that cannot be cut where asked, with the reason and what to do."""


class _Tracer(fx.Tracer):
    """fx's tracer that keeps ``leaf_types`` whole and records what every submodule call
    returns, containers that fx inlines (an ``nn.Sequential``) included, so that a module's
    qualified name can name a cut point."""

    def __init__(self, leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        # qualified name -> the node each call returned (None: not one traced value, e.g. a tuple)
        self.module_calls: dict[str, list[fx.Node | None]] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        out = super().call_module(m, forward, args, kwargs)
        node = out.node if isinstance(out, fx.Proxy) else None  # read now: an attribute proxy makes its node lazily
        self.module_calls.setdefault(self.path_of_module(m), []).append(node)
        return out


def _trace(model: nn.Module, leaf_modules: Sequence[type] | None) -> tuple[fx.Graph, dict[str, list[fx.Node | None]]]:
    """The traced graph and, per called submodule, the node each of its calls returned."""
    tracer = _Tracer(tuple(leaf_modules or ()))
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, NotImplementedError, ...)
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__}: {type(e).__name__}: {e}. "
            "Python control flow on tensor values (if/while on a tensor, data-dependent shapes) "
            "cannot be traced symbolically; pass the class of the submodule that does it in "
            "leaf_modules=[...] so it is kept whole, or rewrite that part without such branching."
        ) from None
    return graph, tracer.module_calls


def _resolve_cuts(
    graph: fx.Graph,
    at: Sequence[str],
    calls: dict[str, list[fx.Node | None]],
    module_names: Sequence[str],
) -> list[fx.Node]:
    """The nodes named by ``at``: an fx node name, or the qualified name of a submodule called
    once (a leaf or a container fx inlines), which names the node its call returned, i.e. the
    module's output as in torchvision's feature extraction. A node name wins over a module
    name spelled the same."""
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    by_name = {n.name: n for n in nodes}
    cuts = []
    for name in at:
        if name in by_name:
            cuts.append(by_name[name])
            continue
        if name not in calls:
            raise TraceError(_unknown_cut(name, by_name, calls, module_names))
        outs = calls[name]
        if len(outs) > 1:
            raise TraceError(
                f"module {name!r} is called {len(outs)} times; name one call's node instead: "
                + ", ".join(o.name if o is not None else "(not one traced value)" for o in outs)
            )
        out = outs[0]
        if out is None:
            raise TraceError(
                f"module {name!r} does not return one traced value (a tuple or a constant, say); "
                "name the node to cut at instead"
            )
        if out.op == "placeholder":
            raise TraceError(f"module {name!r} returns the model's input unchanged; there is nothing before it to cut")
        cuts.append(out)
    if len({c.name for c in cuts}) != len(cuts):
        same = [f"{a!r} -> {c.name}" for a, c in zip(at, cuts) if sum(d is c for d in cuts) > 1]
        raise TraceError(f"cut points must be distinct, got {list(at)} ({', '.join(same)})")
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(cuts, key=order.__getitem__)


def _unknown_cut(
    name: str, by_name: dict[str, fx.Node], calls: dict[str, list[fx.Node | None]], module_names: Sequence[str]
) -> str:
    """Why ``name`` names no cut point, with close matches and the valid names of both kinds."""
    if name in module_names:  # a real submodule that the traced forward never called itself
        leaves = {str(n.target) for n in by_name.values() if n.op == "call_module"}
        inside = next((p for p in _prefixes(name) if p in leaves), None)
        where = (f"it runs inside {inside!r}, which is traced whole (a leaf module): cut at {inside!r}, or "
                 "leave its class out of leaf_modules" if inside else "it is not used by forward, or only "
                 "through an untraced path")
        return f"module {name!r} is never called in the traced graph: {where}"
    single = {m: outs[0] for m, outs in calls.items() if len(outs) == 1 and outs[0] is not None
              and outs[0].op != "placeholder"}
    close = difflib.get_close_matches(name, list(by_name) + [m for m in single if m not in by_name], n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    # A leaf module's dotted name and its call_module node (stem.0 / stem_0) are listed once.
    order = {m: i for i, m in enumerate(module_names)}  # definition order: stem, layer1, layer1.0, ...
    modules = sorted((m for m, n in single.items()
                      if not (n.op == "call_module" and n.target == m) and m not in by_name),
                     key=lambda m: order.get(m, len(order)))
    leaf = next((n for n in by_name.values() if n.op == "call_module" and "." in str(n.target)), None)
    also = f" (leaf modules also by their dotted name: {str(leaf.target)!r} for {leaf.name})" if leaf else ""
    return (
        f"no node or module named {name!r} in the traced graph.{hint} Node names: {', '.join(by_name)}. "
        f"Module names{also}: {', '.join(modules) or 'none besides the leaves'}."
    )


def _prefixes(name: str) -> list[str]:
    """'a.b.c' -> ['a.b', 'a']: the qualified names of a module's ancestors, nearest first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def _build_segments(graph: fx.Graph, cuts: list[fx.Node], root: nn.Module) -> tuple[list[fx.GraphModule], list[list[str]]]:
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise TraceError(
            f"attach_exits needs a model whose forward takes one tensor; this one takes "
            f"{len(placeholders)} inputs ({', '.join(p.name for p in placeholders)})"
        )
    output = next(n for n in nodes if n.op == "output")
    # Nodes that do not depend on the input are recomputed where needed, never carried.
    depends: set[fx.Node] = set(placeholders)
    for n in nodes:
        if any(a in depends for a in n.all_input_nodes):
            depends.add(n)
    for c in cuts:
        if c not in depends:
            raise TraceError(f"cut point {c.name!r} does not depend on the model's input (a parameter or a "
                             "constant); cut at a node computed from the input")
    pos = {n: i for i, n in enumerate(nodes)}
    cut_pos = [pos[c] for c in cuts]
    nseg = len(cuts) + 1

    def seg_of(n: fx.Node) -> int:
        if n.op == "placeholder":
            return -1
        return next((k for k, p in enumerate(cut_pos) if pos[n] <= p), nseg - 1)

    seg = {n: seg_of(n) for n in nodes if n in depends and n.op != "output"}
    # carried[k] = values produced in segments <= k and still used after segment k.
    carried: list[list[fx.Node]] = []
    for k in range(nseg - 1):
        live = [
            n
            for n in seg
            if seg[n] <= k and any(u is output or (u in seg and seg[u] > k) for u in n.users)
        ]
        head = cuts[k]
        carried.append([head] + [n for n in live if n is not head])

    modules = []
    for k in range(nseg):
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        inputs = [placeholders[0]] if k == 0 else carried[k - 1]
        ph = g.placeholder("state")
        if len(inputs) == 1:
            env[inputs[0]] = ph
        else:
            for i, n in enumerate(inputs):
                env[n] = g.call_function(operator.getitem, (ph, i))

        def copy(n: fx.Node) -> fx.Node:
            if n not in env:  # an input-independent node: recompute it here
                for a in n.all_input_nodes:
                    copy(a)
                env[n] = g.node_copy(n, lambda a: env[a])
            return env[n]

        for n in nodes:
            if n in seg and seg[n] == k:
                for a in n.all_input_nodes:
                    copy(a)
                env[n] = g.node_copy(n, lambda a: env[a])
        if k < nseg - 1:
            outs = [env[n] for n in carried[k]]
            g.output(outs[0] if len(outs) == 1 else tuple(outs))
        else:
            result = output.args[0]
            if not isinstance(result, fx.Node):
                raise TraceError("the model must return a single logits tensor [batch, classes]")
            g.output(copy(result))
        g.lint()
        modules.append(fx.GraphModule(root, g, class_name=f"Segment{k}"))
    return modules, [[n.name for n in c] for c in carried]


def attach_exits(
    model: nn.Module,
    at: Sequence[str],
    *,
    input_shape: Sequence[int],
    num_classes: int | None = None,
    head: str | Sequence[str] = "linear",
    head_options: dict | Sequence[dict] | None = None,
    leaf_modules: Sequence[type] | None = None,
):
    """Cut ``model`` at the fx nodes named in ``at`` and attach an exit head at each cut.

    ``at`` takes fx node names (``layer1_0_relu``, ``cat``, ``add_1``) or the qualified name of
    any submodule called once, a container fx inlines included (``stem``, ``layer1.0``): the
    cut is then at that module's output, the value its call returns. A wrong name lists the
    valid ones. ``input_shape`` is one sample's shape, e.g. ``(3, 32, 32)``. The returned
    network shares its parameters with ``model``; its final exit is ``model``'s own output.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach_exits needs an nn.Module, got {type(model).__name__}")
    if not at:
        raise TraceError("attach_exits needs at least one cut point in `at`")
    graph, module_calls = _trace(model, leaf_modules)
    cuts = _resolve_cuts(graph, list(at), module_calls, [m for m, _ in model.named_modules() if m])
    segments, carried = _build_segments(graph, cuts, model)
    input_shape = tuple(int(s) for s in input_shape)
    batch = 3  # odd, so that a batch dimension is not confused with a small fixed one
    try:
        outs = dry_run(segments, input_shape, batch=batch)
    except Exception as e:
        raise TraceError(
            f"running the cut {type(model).__name__} on a zero input of shape {input_shape} failed: "
            f"{type(e).__name__}: {e}. Check input_shape."
        ) from None
    for k, out in enumerate(outs[:-1]):
        for name, v in zip(carried[k], out if isinstance(out, tuple) else (out,)):
            if not (isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == batch):
                what = type(v).__name__ if not isinstance(v, Tensor) else f"a tensor of shape {tuple(v.shape)}"
                raise TraceError(
                    f"cutting at {cuts[k].name!r} would carry {name!r} ({what}) to the next segment; only "
                    "tensors with a leading batch dimension can cross a cut. Cut at another node."
                )
    final = outs[-1]
    if not (isinstance(final, Tensor) and final.dim() == 2 and final.shape[0] == batch):
        got = tuple(final.shape) if isinstance(final, Tensor) else type(final).__name__
        raise TraceError(f"the model must return logits of shape [batch, classes]; it returned {got}")
    if num_classes is not None and final.shape[1] != num_classes:
        raise TraceError(f"num_classes={num_classes} but the model returns {final.shape[1]} logits")
    names = [c.name for c in cuts] + ["output"]
    backbone = Backbone(segments, nn.Identity(), input_shape=input_shape, stage_names=names)
    source: dict[str, Any] = {
        "kind": "traced",
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "at": names[:-1],
        # Informational only: classes cannot go into JSON, so loading takes them again.
        "leaf_modules": [f"{t.__module__}.{t.__qualname__}" for t in leaf_modules or ()],
    }
    return MultiExitNetwork(backbone, list(range(len(cuts))), head, head_options, source=source)


def _rebuild(
    config: dict[str, Any], *, model: nn.Module | None, leaf_modules: Sequence[type] | None
) -> MultiExitNetwork:
    """:meth:`MultiExitNetwork.from_config` for a network made by :func:`attach_exits`: cut the
    user's fresh ``model`` again where the description says."""
    src = config["source"]
    if model is None:
        raise ValueError(
            f"this network was made by attach_exits on a user model ({src.get('model_class')}); "
            "its code is not stored with the weights: pass model=<a fresh instance of that model>"
        )
    n = len(src["at"])
    return attach_exits(
        model,
        at=src["at"],
        input_shape=config["input_shape"],
        num_classes=config["num_classes"],
        head=config["head"],
        head_options=[resolve_head_options(str(h), dict(o or {}), saved=True) for h, o in zip(
            _per_exit(config["head"], n, "head"), _per_exit(config["head_options"] or {}, n, "head_options"))],
        leaf_modules=leaf_modules,
    )


_REBUILDERS["traced"] = _rebuild
