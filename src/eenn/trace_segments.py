"""The segments of a traced model cut at given nodes (:mod:`eenn.trace`): which values cross
each cut and how each is carried so that it survives the engine's compaction (a leading batch
dimension as it is; no batch dimension broadcast in front; ``B * k`` rows split into ``[B, k]``;
numbers written in as constants or read back from the state's batch size), and the
``fx.GraphModule`` of every segment; the padding mask a token network carries across every cut;
and the digests that tell at load time a model built otherwise."""
from __future__ import annotations

import hashlib
import operator
from typing import Any, Sequence

import torch
from torch import Tensor, fx, nn

from .trace_export import TraceError

__all__: list[str] = []


def _broadcast(value: Tensor, like: Tensor) -> Tensor:
    """``value`` (no batch dimension) with one in front, as long as ``like``'s: a view."""
    return value.unsqueeze(0).expand(like.shape[0], *value.shape)


def _unbroadcast(value: Tensor) -> Tensor:
    return value[0]


def _split_rows(value: Tensor, like: Tensor) -> Tensor:
    """``[B * k, ...]`` -> ``[B, k, ...]`` with ``B`` the batch of ``like``."""
    return value.reshape(like.shape[0], -1, *value.shape[1:])


def _batch_size(like: Tensor, factor: int) -> int:
    return like.size(0) if factor == 1 else like.size(0) * factor


def _as_tuple(*items):
    return tuple(items)


def _as_list(*items):
    return list(items)


def _as_size(*items):
    return torch.Size(items)


_PACK = {tuple: _as_tuple, list: _as_list, torch.Size: _as_size}
_LITERAL = (int, float, bool, str, type(None), torch.dtype)


def _carry_kind(a: Any, b: Any, ba: int, bb: int) -> tuple | None:
    """How a value alive across a cut is carried, from its values ``a`` and ``b`` at batch
    sizes ``ba`` and ``bb`` (see the module's docstring); None: it cannot be."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.dim() >= 1 and (a.shape[0], b.shape[0]) == (ba, bb) and a.shape[1:] == b.shape[1:]:
            return ("batch",)
        if a.shape == b.shape:
            return ("broadcast",)
        if a.dim() >= 1 and a.shape[1:] == b.shape[1:] and a.shape[0] % ba == 0 and b.shape[0] == a.shape[0] // ba * bb:
            return ("rows",)
        return None
    if type(a) is int and type(b) is int and a != b:
        return ("batch_size", a // ba) if a % ba == 0 and b == a // ba * bb else None
    if type(a) in _PACK and type(a) is type(b) and len(a) == len(b):
        kinds = [_carry_kind(x, y, ba, bb) for x, y in zip(a, b)]
        if all(k is not None and k[0] in ("constant", "batch_size") for k in kinds):
            return ("pack", _PACK[type(a)], kinds)
        return None
    if isinstance(a, _LITERAL) and type(a) is type(b) and a == b:
        return ("constant", a)
    return None


def _build_segments(
    graph: fx.Graph, cuts: list[fx.Node], root: nn.Module, kinds: list[list[tuple]] | None = None,
    *, keep: fx.Node | None = None,
) -> tuple[list[fx.GraphModule], list[list[str]]]:
    """The segments; ``kinds[k][i]`` says how the ``i``-th value alive across cut ``k`` is
    carried (:func:`_carry_kind`); without it every value is handed on as it is (to find out).
    ``keep`` (the padding mask's node) crosses every cut, last, whether or not the model reads
    it: the exit heads do."""
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
    for n in nodes:  # a tuple's elements are taken where it is made: only they may cross a cut
        if n.op == "call_function" and n.target is operator.getitem and n.args[0] in seg and n in seg:
            seg[n] = min(seg[n], seg[n.args[0]])
    # carried[k] = values produced in segments <= k and still used after segment k.
    carried: list[list[fx.Node]] = []
    for k in range(nseg - 1):
        live = [
            n
            for n in seg
            if seg[n] <= k and any(u is output or (u in seg and seg[u] > k) for u in n.users)
        ]
        head = cuts[k]
        carried.append([head] + [n for n in live if n is not head and n is not keep] + ([keep] if keep else []))
    if kinds is None:
        kinds = [[("batch",)] * len(c) for c in carried]
    sent = [[i for i, kd in enumerate(kk) if kd[0] in ("batch", "broadcast", "rows")] for kk in kinds]

    modules = []
    for k in range(nseg):
        g = fx.Graph()
        env: dict[fx.Node, Any] = {}
        ph = g.placeholder("state")
        if k == 0:
            env[placeholders[0]] = ph
        else:
            inputs, kk, got = carried[k - 1], kinds[k - 1], sent[k - 1]
            received = {i: ph if len(got) == 1 else g.call_function(operator.getitem, (ph, j))
                        for j, i in enumerate(got)}
            head = received[0]

            def unpack(kd: tuple, i: int | None = None) -> Any:
                if kd[0] == "batch":
                    return received[i]
                if kd[0] == "broadcast":
                    return g.call_function(_unbroadcast, (received[i],))
                if kd[0] == "rows":
                    return g.call_method("flatten", (received[i], 0, 1))
                if kd[0] == "constant":
                    return kd[1]
                if kd[0] == "batch_size":
                    return g.call_function(_batch_size, (head, kd[1]))
                return g.call_function(kd[1], tuple(unpack(sub) for sub in kd[2]))  # "pack"

            for i, (n, kd) in enumerate(zip(inputs, kk)):
                env[n] = unpack(kd, i)

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
            head = env[carried[k][0]]
            wrap = {"batch": lambda v: v, "broadcast": lambda v: g.call_function(_broadcast, (v, head)),
                    "rows": lambda v: g.call_function(_split_rows, (v, head))}
            outs = [wrap[kinds[k][i][0]](env[carried[k][i]]) for i in sent[k]]
            g.output(outs[0] if len(outs) == 1 else tuple(outs))
        else:
            result = output.args[0]
            if isinstance(result, (tuple, list)) and len(result) == 1:  # torch.export's flat outputs
                result = result[0]
            if not isinstance(result, fx.Node):
                raise TraceError("the model must return a single logits tensor [batch, classes]")
            g.output(copy(result))
        g.lint()
        modules.append(fx.GraphModule(root, g, class_name=f"Segment{k}"))
    return modules, [[n.name for n in c] for c in carried]


def _add_keep(graph: fx.Graph, pad_id: int) -> fx.Node | None:
    """Add ``input != pad_id`` (the tokens that are not padding) after the model's input; None
    when the graph has not exactly one input (the segments then say what is wrong)."""
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return None
    with graph.inserting_after(inputs[0]):
        return graph.create_node("call_function", operator.ne, (inputs[0], pad_id), name="eenn_keep")


def _leaf_digest(segments: Sequence[fx.GraphModule]) -> str:
    """A digest of the settings of the modules the segments call whole: for each module under
    them, its type and its public attributes of plain types (and functions by name)."""
    h = hashlib.sha256()
    for seg in segments:
        for node in seg.graph.nodes:
            if node.op != "call_module":
                continue
            for name, sub in seg.get_submodule(node.target).named_modules():
                conf = sorted((k, getattr(v, "__name__", None) if callable(v) else v) for k, v in vars(sub).items()
                              if not k.startswith("_") and k != "training"
                              and (callable(v) or isinstance(v, (bool, int, float, str, type(None)))))
                h.update(f"{node.target}.{name}:{type(sub).__qualname__}:{conf}\n".encode())
    return h.hexdigest()[:16]


def _graph_digest(segments: Sequence[fx.GraphModule]) -> str:
    """A digest of the segments' generated code (their operators, constants and wiring; comments,
    which may name source files, left out)."""
    h = hashlib.sha256()
    for seg in segments:
        for line in seg.code.splitlines():
            if line.strip() and not line.strip().startswith("#"):
                h.update(line.rstrip().encode() + b"\n")
        h.update(b"--segment--\n")
    return h.hexdigest()[:16]
