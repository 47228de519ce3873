"""Cut any ``nn.Module`` into consecutive segments at named ``torch.fx`` nodes and attach exits.

A cut in a non-sequential graph can leave more than one value alive: the input of a residual
add that spans the cut, say. Each segment therefore returns the cut node's value first (that is
what the exit head reads) followed by every other value a later segment still needs, and the
next segment takes them all. Values that do not depend on the input (parameters read with
``get_attr``, constants) are recomputed in every segment that uses them instead of carried.

What crosses a cut must survive the engine's compaction, which keeps the running samples of
every carried tensor with ``index_select(0, idx)``. The cut model is run at two batch sizes to
see how each carried value depends on the batch, and each is carried accordingly:

- a tensor with a leading batch dimension (a state, an attention mask [B, L]) as it is;
- a tensor without one (position ids [1, L], a broadcast mask [1, 1, L, L]) with a batch
  dimension in front (a broadcast ``expand``, no copy), which the next segment drops again;
- a tensor of ``B * k`` rows (tokens flattened with the samples) as ``[B, k, ...]``;
- a Python number, or a tuple of them (sizes read from the input's shape), not at all: a
  constant is written into the next segment, the batch size (times a factor) is read there
  from the state, so it is right after compaction.

Models that ``torch.fx`` cannot trace symbolically, Hugging Face models among them, can be
traced with ``torch.export`` instead (``tracer="export"``; :func:`eenn.hf.encoder` does this).
"""
from __future__ import annotations

import difflib
import functools
import operator
import warnings
from typing import Any, Sequence

import torch
from torch import Tensor, fx, nn

from .backbones.base import Backbone, dry_run
from .heads import resolve_head_options
from .network import _REBUILDERS, MultiExitNetwork, _per_exit
from .trace_export import TraceError, _export
from .trace_segments import _add_keep, _build_segments, _carry_kind, _graph_digest, _leaf_digest
from .userframe import caller_stacklevel

__all__ = ["attach_exits", "TraceError"]


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
        if isinstance(m, self.leaf_types):
            return True
        if isinstance(m, nn.TransformerEncoder):  # traced layer by layer, see _encoder_forward
            return False
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if isinstance(m, nn.TransformerEncoder) and not isinstance(m, self.leaf_types):
            forward = functools.partial(_encoder_forward, m)
            padded = kwargs.get("src_key_padding_mask", args[2] if len(args) > 2 else None) is not None
            if padded and getattr(m, "use_nested_tensor", False):
                warnings.warn(
                    f"{self.path_of_module(m)}: an nn.TransformerEncoder built with enable_nested_tensor=True leaves "
                    "padded positions as zeros in inference (its nested-tensor path); cut, it computes them. A model "
                    "that reads padded positions after it (an unmasked mean, say) then answers otherwise at the final "
                    "exit than on its own: build the encoder with enable_nested_tensor=False", UserWarning, stacklevel=caller_stacklevel())
        out = super().call_module(m, forward, args, kwargs)
        # read now: an attribute proxy makes its node lazily. A module returning a tuple whose
        # first element is traced (a Hugging Face layer: hidden state, attention weights) names
        # that element.
        first = out[0] if isinstance(out, (tuple, list)) and len(out) else out
        node = first.node if isinstance(first, fx.Proxy) else None
        self.module_calls.setdefault(self.path_of_module(m), []).append(node)
        return out


def _encoder_forward(encoder: nn.TransformerEncoder, src, mask=None, src_key_padding_mask=None, is_causal=None):
    """nn.TransformerEncoder's forward without its checks for the nested-tensor fast path,
    which branch on tensor properties and cannot be traced: its layers in turn, then its norm.
    The layers stay whole (and keep their own fast path in inference), and each can be named as
    a cut point (``blocks.layers.1``). Padded positions are computed, not left as zeros as the
    nested-tensor path leaves them; the other positions are the same."""
    out = src
    extra = {} if is_causal is None else {"is_causal": is_causal}
    for layer in encoder.layers:
        out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask, **extra)
    return encoder.norm(out) if encoder.norm is not None else out


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
            "leaf_modules=[...] so it is kept whole, rewrite that part without such branching, or "
            "trace with torch.export, which follows shapes: attach_exits(..., tracer=\"export\")."
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
            cuts.append(_first_element(name, by_name[name]))
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
        cuts.append(_first_element(name, out))
    if len({c.name for c in cuts}) != len(cuts):
        same = [f"{a!r} -> {c.name}" for a, c in zip(at, cuts) if sum(d is c for d in cuts) > 1]
        raise TraceError(f"cut points must be distinct, got {list(at)} ({', '.join(same)})")
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(cuts, key=order.__getitem__)


def _check_final_segment(graph: fx.Graph, last: fx.Node) -> None:
    """Refuse a last cut after which the model computes nothing (at its output node, the final
    classifier, say): the final exit would be an empty segment behind a head of its own."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    todo = list(graph.output_node().all_input_nodes)  # what the output is computed from
    seen: set[fx.Node] = set()
    while todo:
        n = todo.pop()
        if n in seen or order[n] <= order[last]:  # the cut itself, or computed before it
            continue
        if n.op.startswith("call_"):
            return
        seen.add(n)
        todo.extend(n.all_input_nodes)
    raise TraceError(f"cutting at {last.name!r} leaves the final segment nothing to compute ({last.name!r} gives the "
                     "model's output): cut before the model's output; the final exit is the model's own")


def _first_element(name: str, node: fx.Node) -> fx.Node:
    """A call that returns a tuple (a leaf module such as nn.MultiheadAttention, whose value is
    only ever indexed) is cut at its element 0, the hidden state by convention."""
    users = list(node.users)
    if users and all(u.op == "call_function" and u.target is operator.getitem for u in users):
        first = [u for u in users if u.args[1] == 0]
        if len(first) == 1:
            return first[0]
        raise TraceError(f"module {name!r} returns a tuple whose element 0 is not used; name the node to cut "
                         f"at instead: {', '.join(u.name for u in users)}")
    return node


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


_FROM_MODEL: Any = object()  # attach_exits' pad_id when not given: the model's eenn_pad_id


def attach_exits(
    model: nn.Module,
    at: str | Sequence[str],
    *,
    input_shape: Sequence[int],
    num_classes: int | None = None,
    head: str | Sequence[str] = "linear",
    head_options: dict | Sequence[dict] | None = None,
    leaf_modules: Sequence[type] | None = None,
    input_dtype: torch.dtype | None = None,
    tracer: str | None = None,
    pad_id: Any = _FROM_MODEL,
):
    """Cut ``model`` at the fx nodes named in ``at`` and attach an exit head at each cut.

    ``at`` takes fx node names (``layer1_0_relu``, ``cat``, ``add_1``) or the qualified name of
    any submodule called once, a container fx inlines included (``stem``, ``layer1.0``,
    ``blocks.layers.1`` in an ``nn.TransformerEncoder``): the cut is then at that module's
    output, the value its call returns (element 0 when it returns a tuple). One name alone is
    one cut. A wrong name lists the valid ones. ``input_shape`` is one sample's shape, e.g.
    ``(3, 32, 32)``, or ``(L,)`` for token ids with ``input_dtype=torch.long``. ``tracer`` is ``"fx"`` (``torch.fx``'s symbolic
    tracing, the default) or ``"export"`` (``torch.export``, for models whose Python code
    branches on shapes, e.g. Hugging Face models; node names are then those of ATen operators);
    a model may name its own with an ``eenn_tracer`` attribute. ``pad_id`` (token ids only): the
    id that pads a sequence; the exit heads then leave padded positions out (a mean over the
    real tokens; attention pooling that gives them no weight), the mask ``ids != pad_id`` being
    carried across the cuts with the samples. By default the model's ``eenn_pad_id`` attribute
    (:func:`eenn.hf.encoder` sets it to its ``pad_token_id``), else None: every position is read.
    The returned network shares its parameters with ``model``; its final exit is ``model``'s own output.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach_exits needs an nn.Module, got {type(model).__name__}")
    at = [at] if isinstance(at, str) else at
    if not isinstance(at, (list, tuple)) or not all(isinstance(a, str) for a in at):
        raise TypeError(f"attach_exits: at must be a node or module name or a list of them, got {at!r}")
    if not at:
        raise TraceError("attach_exits needs at least one cut point in `at`")
    if input_dtype is not None and not isinstance(input_dtype, torch.dtype):
        raise TypeError(f"input_dtype must be a torch.dtype such as torch.long, got {input_dtype!r}")
    tracer = tracer or getattr(model, "eenn_tracer", "fx")
    if isinstance(input_shape, int) and not isinstance(input_shape, bool):
        input_shape = (input_shape,)  # one dimension: a sequence's length, a feature vector's size
    input_shape = tuple(int(s) for s in input_shape)
    pad_id = getattr(model, "eenn_pad_id", None) if pad_id is _FROM_MODEL else pad_id
    if pad_id is not None:
        if isinstance(pad_id, bool) or not isinstance(pad_id, int):
            raise TypeError(f"attach_exits: pad_id must be a token id (an int) or None, got {pad_id!r}")
        if input_dtype is None or input_dtype.is_floating_point or len(input_shape) != 1:
            raise TraceError("attach_exits: pad_id applies to token ids: give input_shape=(length,) and "
                             "input_dtype=torch.long, or leave pad_id out")
    if tracer == "fx":
        graph, module_calls = _trace(model, leaf_modules)
        root = model
    elif tracer == "export":
        if leaf_modules:
            raise TraceError("leaf_modules applies to tracer='fx'; torch.export traces every module through")
        root, module_calls = _export(model, input_shape, input_dtype)
        graph = root.graph
    else:
        raise TraceError(f"tracer must be 'fx' or 'export', got {tracer!r}")
    cuts = _resolve_cuts(graph, list(at), module_calls, [m for m, _ in model.named_modules() if m])
    _check_final_segment(graph, cuts[-1])
    keep = _add_keep(graph, pad_id) if pad_id is not None else None
    segments, carried = _build_segments(graph, cuts, root, keep=keep)
    # Two odd batch sizes, so that a batch dimension is not confused with a small fixed one, and
    # the way every carried value depends on the batch shows.
    batches = (3, 5)
    try:
        runs = [dry_run(segments, input_shape, batch=b, input_dtype=input_dtype) for b in batches]
    except Exception as e:
        kind = f"{input_dtype} " if input_dtype is not None else ""
        raise TraceError(
            f"running the cut {type(model).__name__} on a zero {kind}input of shape {input_shape} failed: "
            f"{type(e).__name__}: {e}. Check input_shape (and input_dtype: torch.long for token ids)."
        ) from None
    kinds = []
    for k in range(len(cuts)):
        outs = [r[k] if isinstance(r[k], tuple) else (r[k],) for r in runs]
        kinds.append([])
        for i, (name, a, b) in enumerate(zip(carried[k], *outs)):
            kind = _carry_kind(a, b, *batches)
            if kind is None or (i == 0 and kind[0] != "batch"):
                what = type(a).__name__ if not isinstance(a, Tensor) else f"a tensor of shape {tuple(a.shape)}"
                raise TraceError(
                    f"cutting at {cuts[k].name!r} would carry {name!r} ({what}) to the next segment: "
                    + ("the cut point itself must be a tensor with a leading batch dimension. " if i == 0 else
                       "only tensors (with or without a leading batch dimension), numbers and tuples of them "
                       "can cross a cut, and a tensor's shape may depend on the batch only in its first "
                       "dimension. ") + (_SEQUENCE_FIRST if i == 0 and _sequence_first(model) else "Cut at another node.")
                )
            kinds[-1].append(kind)
    segments, carried = _build_segments(graph, cuts, root, kinds, keep=keep)
    final = runs[0][-1]
    if not (isinstance(final, Tensor) and final.dim() == 2 and final.shape[0] == batches[0]):
        got = tuple(final.shape) if isinstance(final, Tensor) else type(final).__name__
        raise TraceError(f"the model must return logits of shape [batch, classes]; it returned {got}")
    if num_classes is not None and final.shape[1] != num_classes:
        raise TraceError(f"num_classes={num_classes} but the model returns {final.shape[1]} logits")
    names = [c.name for c in cuts] + ["output"]
    backbone = Backbone(segments, nn.Identity(), input_shape=input_shape, stage_names=names, input_dtype=input_dtype)
    backbone.carries_keep = keep is not None
    source: dict[str, Any] = {
        "kind": "traced",
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "at": names[:-1],
        # Informational only: classes cannot go into JSON, so loading takes them again.
        "leaf_modules": [f"{t.__module__}.{t.__qualname__}" for t in leaf_modules or ()],
        "tracer": tracer,
        # what the cut graph computes, to tell at load time a model built otherwise (another pad
        # id, changed code) from the one the weights were trained in: see _rebuild
        "graph": _graph_digest(segments),
        # and how the modules the graph calls whole are configured (heads, norm_first, ... of an
        # nn.TransformerEncoderLayer: settings that are not weights and not in the graph's code)
        "leaves": _leaf_digest(segments),
        "torch": _torch_version(),
    }
    if input_dtype is not None:
        source["input_dtype"] = str(input_dtype).removeprefix("torch.")
    if pad_id is not None:
        source["pad_id"] = pad_id
    return MultiExitNetwork(backbone, list(range(len(cuts))), head, head_options, source=source)


_SEQUENCE_FIRST = ("The model has transformer layers with batch_first=False, whose states are [length, batch, "
                   "dim] throughout: no cut inside them has the batch first. Build the layers with "
                   "batch_first=True (the same weights load) to attach exits to them.")


def _sequence_first(model: nn.Module) -> bool:
    """Whether ``model`` holds PyTorch transformer layers that keep the sequence first."""
    kinds = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.MultiheadAttention)
    return any(isinstance(m, kinds) and not getattr(m, "batch_first", True) for m in model.modules())


def _torch_version() -> str:
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


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
    net = attach_exits(
        model,
        at=src["at"],
        input_shape=config["input_shape"],
        num_classes=config["num_classes"],
        head=config["head"],
        head_options=[resolve_head_options(str(h), dict(o or {}), saved=True) for h, o in zip(
            _per_exit(config["head"], n, "head"), _per_exit(config["head_options"] or {}, n, "head_options"))],
        leaf_modules=leaf_modules,
        input_dtype=getattr(torch, src["input_dtype"]) if src.get("input_dtype") else None,
        tracer=src.get("tracer", "fx"),
        pad_id=src.get("pad_id"),  # a description saved before pad_id masked nothing
    )
    now = net.config["source"]
    # Traced by the same PyTorch, the same model gives the same code; another version may trace
    # the same model otherwise, so then nothing is said.
    if src.get("graph") and src.get("torch") == now["torch"] and (
            src["graph"] != now["graph"] or src.get("leaves", now["leaves"]) != now["leaves"]):
        warnings.warn(f"the {type(model).__name__} given traces to another graph than the one these weights were "
                      f"saved with (model {src.get('model_class')}): it is built otherwise (another constant, such as "
                      "a pad id, or changed code); the weights load, but the network may not compute what it did",
                      UserWarning, stacklevel=4)
    return net


_REBUILDERS["traced"] = _rebuild
