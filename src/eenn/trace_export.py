"""Tracing a model with ``torch.export`` for :func:`eenn.trace.attach_exits` (``tracer="export"``;
Hugging Face models through :func:`eenn.hf.encoder`): the ATen graph made fit to be cut.

torch.export follows shapes where ``torch.fx`` cannot, and records a dynamic batch dimension;
its graph calls ATen operators, keeps checks that mean nothing in a segment, and records the
module calls in each node's ``nn_module_stack`` rather than as ``call_module`` nodes. Here the
checks go, sizes read from the input are handed to public functions (which the ONNX exporter
follows), dropout becomes ``nn.Dropout`` modules (attention dropout, which the eval-mode trace
holds at 0, a module with the model's probability), and every module call is mapped to the node
it hands on, so that cut points can be named by module as with ``torch.fx``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx, nn


class TraceError(ValueError):
    """A model that cannot be cut where asked, with the reason and what to do (raised by
    :func:`eenn.attach_exits`; defined here, below :mod:`eenn.trace`, which re-exports it)."""

    __module__ = "eenn.trace"  # where users import it from

# torch.export leaves checks in its graph that mean nothing in a segment: asserts on tensor
# metadata and symbolic sizes (call_function nodes without users).
_EXPORT_CHECKS = ("_assert", "sym_constrain_range")


def _export(model: nn.Module, input_shape: tuple[int, ...], input_dtype: torch.dtype | None,
            ) -> tuple[fx.GraphModule, dict[str, list[fx.Node | None]]]:
    """``model`` traced with ``torch.export`` (ATen operators, a dynamic batch dimension), made
    fit to be cut: its checks removed, symbolic sizes read with ``Tensor.size`` and handed to
    public functions (``x.view``, ``x.expand``, ``torch.arange``; see :func:`_size_traceable`)
    so that the ONNX exporter keeps the batch dimension dynamic, dropout as ``nn.Dropout`` modules that follow
    ``train()``/``eval()`` (the export is made in eval mode). The second value maps every
    module called to the node each call handed on, from the graph's ``nn_module_stack``."""
    p = next(iter(model.parameters()), None)
    dtype = input_dtype or (p.dtype if p is not None and p.is_floating_point() else torch.float32)
    x = torch.zeros(3, *input_shape, dtype=dtype, device=p.device if p is not None else None)
    was = model.training
    model.eval()
    try:
        ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    except Exception as e:  # noqa: BLE001 - torch.export raises many types
        raise TraceError(
            f"torch.export cannot trace {type(model).__name__} on an input of shape {(3, *input_shape)} "
            f"({dtype}): {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}. "
            "Check input_shape and input_dtype; a model that treats the batch size as fixed cannot be cut."
        ) from None
    finally:
        model.train(was)
    gm = ep.module()
    g = gm.graph
    drops = 0
    sizes: set[fx.Node] = set()  # symbolic sizes (the batch size) and numbers computed from them
    for n in list(g.nodes):
        if n.op == "call_module" and str(n.target).startswith("_guards"):
            g.erase_node(n)
        elif n.op == "call_function" and not n.users and any(c in str(n.target) for c in _EXPORT_CHECKS):
            g.erase_node(n)
        elif n.op == "call_function" and n.target is torch.ops.aten.sym_size.int:
            with g.inserting_before(n):
                new = g.call_method("size", tuple(n.args))
            new.meta = dict(n.meta)
            n.replace_all_uses_with(new)
            g.erase_node(n)
            sizes.add(new)
        elif n.op == "call_function" and n.target in (torch.ops.aten.arange.default, torch.ops.aten.arange.start):
            # torch.arange takes a traced size (a tensor while the ONNX exporter traces), the
            # ATen operator only a number
            n.target = torch.arange
            n.kwargs = {k: v for k, v in n.kwargs.items() if k != "pin_memory"}
        elif n.op == "call_function" and n.target is torch.ops.aten.dropout.default:
            name = f"eenn_dropout_{drops}"
            drops += 1
            gm.add_submodule(name, nn.Dropout(float(n.args[1])))
            with g.inserting_before(n):
                new = g.call_module(name, (n.args[0],))
            new.meta = dict(n.meta)
            n.replace_all_uses_with(new)
            g.erase_node(n)
        elif n.op == "call_function" and n.target is torch.ops.aten.scaled_dot_product_attention.default:
            p = _attention_dropout(model, n)
            if p:  # exported in eval mode, the call holds dropout_p = 0: give it back for training
                name = f"eenn_attention_{drops}"
                drops += 1
                gm.add_submodule(name, _Attention(p))
                with g.inserting_before(n):
                    new = g.call_module(name, tuple(n.args), dict(n.kwargs))
                new.meta = dict(n.meta)
                n.replace_all_uses_with(new)
                g.erase_node(n)
        elif n.op == "call_function" and not isinstance(n.target, torch._ops.OpOverload) and \
                any(a in sizes for a in n.all_input_nodes):
            sizes.add(n)  # arithmetic on sizes (operator.mul, ...): kept as it is, traced on a size
        elif isinstance(n.target, torch._ops.OpOverload) and any(a in sizes for a in n.all_input_nodes):
            _size_traceable(g, n)
    g.lint()
    return gm, _export_module_calls(g, model)


class _Attention(nn.Module):
    """``scaled_dot_product_attention`` with the model's attention dropout while training (none
    in eval mode, as the model's own attention does)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        return torch.ops.aten.scaled_dot_product_attention(q, k, v, attn_mask, self.p if self.training else 0.0,
                                                           is_causal, **kw)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _attention_dropout(model: nn.Module, n: fx.Node) -> float:
    """The attention dropout of the module that made the attention call ``n`` (its ``dropout``
    probability, or its config's ``attention_probs_dropout_prob`` / ``attention_dropout``); 0
    where none is found."""
    stack = n.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        try:
            mod = model.get_submodule(path.removeprefix("L['self'].").removeprefix("self."))
        except AttributeError:
            continue
        for value in (getattr(mod, "dropout", None), getattr(mod, "dropout_prob", None)):
            p = value.p if isinstance(value, nn.Dropout) else value
            if isinstance(p, float):
                return p
        conf = getattr(mod, "config", None)
        for key in ("attention_probs_dropout_prob", "attention_dropout"):
            if isinstance(getattr(conf, key, None), float):
                return float(getattr(conf, key))
    return 0.0


def _slice(x: Tensor, dim: int, start: Any = None, end: Any = None, step: int = 1) -> Tensor:
    """``aten.slice`` as indexing, which the ONNX exporter's tracer follows with a traced bound."""
    return x[(slice(None),) * dim + (slice(start, end, step),)]


def _size_traceable(g: fx.Graph, n: fx.Node) -> None:
    """Rewrite ``n``, an ATen operator that takes a size read from the input (``view(x, [B, 12,
    -1, 16])``, ``expand``, ``new_zeros``, ...), as the public ``Tensor`` method or ``torch``
    function of that name. The result is the same; the difference is for the ONNX exporter,
    whose tracer follows a size through the public functions but sees only a number when an
    ATen operator is called directly, which would fix the batch size of the trace in the graph.
    An operator without a public form is left as it is (the exporter's check at a second batch
    size finds it)."""
    op = n.target
    name = op._schema.name.split("::")[-1]
    params = op._schema.arguments
    args, kwargs = [], dict(n.kwargs)
    for p, v in zip(params, n.args):
        if p.kwarg_only:
            kwargs[p.name] = v
        else:
            args.append(v)
    if name == "slice":
        kind, target = "call_function", _slice
    elif params and params[0].name == "self" and hasattr(Tensor, name) and not name.startswith("_"):
        kind, target = "call_method", name
    elif hasattr(torch, name) and not name.startswith("_"):
        kind, target = "call_function", getattr(torch, name)
    else:
        return
    with g.inserting_before(n):
        new = g.create_node(kind, target, tuple(args), kwargs)
    new.meta = dict(n.meta)
    n.replace_all_uses_with(new)
    g.erase_node(n)


def _export_module_calls(g: fx.Graph, model: nn.Module) -> dict[str, list[fx.Node | None]]:
    """Per submodule (qualified name), the node each call hands on: the one node of the call
    (input-dependent) that a node outside it uses, sizes aside (torch.export shares a size
    computed in one layer, batch x heads say, with the layers after it); None when that is not
    exactly one."""
    names = {m for m, _ in model.named_modules() if m}
    members: dict[str, list[fx.Node]] = {}  # one entry per call (nn_module_stack key)
    path_of: dict[str, str] = {}
    for n in g.nodes:
        for key, (path, _) in (n.meta.get("nn_module_stack") or {}).items():
            path = _export_path(str(path), names)
            if path:
                members.setdefault(key, []).append(n)
                path_of[key] = path
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    depends = set(placeholders)
    for n in g.nodes:
        if any(a in depends for a in n.all_input_nodes):
            depends.add(n)
    calls: dict[str, list[fx.Node | None]] = {}
    for key, nodes in members.items():
        inside = set(nodes)
        outs = [n for n in nodes if n in depends and any(u not in inside for u in n.users)]
        if len(outs) > 1:
            outs = [n for n in outs if not isinstance(n.meta.get("val"), (int, torch.SymInt))]
        calls.setdefault(path_of[key], []).append(outs[0] if len(outs) == 1 else None)
    return calls


def _export_path(path: str, names: set[str]) -> str:
    """A module path as torch.export records it (``bert.encoder.layer.1``, or with a prefix
    such as ``L['self'].``) as the model's qualified name; '' for the model itself."""
    for cand in (path, path.split("].", 1)[-1], path.removeprefix("self.")):
        if cand in names:
            return cand
    return ""
