"""One ONNX graph for the whole exit loop: every segment, its exit head and the exit rule, chained
with ONNX ``If`` nodes, so that a sample (or a batch) costs one onnxruntime call whatever exits
it takes.

Why. At batch 1 the staged runner calls onnxruntime once per segment and decides in Python
between the calls; for a small network that overhead is a large part of the time, and the early
exit then loses to the static network run as one graph. Here the decision is in the graph::

    segment 0 -> logits_0 -> score_0 -> If(score_0 fires) then (answer of exit 0)
                                                       else segment 1 -> ... -> the final exit

For a batch (``batched=True``) every level answers all its rows with its exit, gathers the rows
that do not fire, runs the next level on them (inside an ``If``: only when some go on) and
scatters their answers back over its own::

    segment k (n rows) -> answers of exit k -> stay = NonZero(not fires)
        -> If(stay not empty) then ScatterND(answers, stay, level k+1 on Gather(state, stay))
                              else answers

That is the staged runner's compaction without Python between the segments: no call per
segment, no PyTorch code whose threads compete with onnxruntime's, one thread pool.

The rule is one of the per-exit rules (``max_prob``, ``entropy``, ``margin``, ``gate``) with the
final-exit fallback; the thresholds are an input of the graph (``thresholds [E-1]``), so one
file serves any calibration of that rule. Other policies run through the staged runner.

:func:`eenn.exporter.export` writes the batch-1 graph (``fused_batch1.onnx``, portable, checked
sample by sample against the staged runner); :class:`eenn.staged.StagedRunner` builds both its
own from the segments as onnxruntime optimises them on the machine it runs on (onnxruntime keeps
its fastest convolution layout out of ``If`` branches, so the portable file runs the later
segments about twice as slowly as they run alone).

Inputs ``input [B, ...]`` (B = 1 unless batched) and ``thresholds [E-1]``; outputs
``prediction [B]`` (int64), ``exit [B]`` (int64) and ``probs [B, C]`` (softmax of the answering
exit). The scores are computed by onnxruntime, so, as for the staged runner, a score within
float rounding (~1e-6) of its threshold may decide the other way than PyTorch does.
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["FUSED_RULES", "fuse_segments"]

FUSED_RULES = ("max_prob", "entropy", "margin", "gate")


def fuse_segments(segments: Sequence[bytes], specs: Sequence[dict], rule: str, num_classes: int,
                  opset: int, *, batched: bool = False) -> bytes:
    """The fused graph from the segments' ONNX bytes and their manifest entries (``inputs``,
    ``outputs``, ``num_state_outputs``, ``cascade``). ``batched``: the graph for any batch size,
    with the compaction inside (see the module docstring)."""
    import onnx
    from onnx import TensorProto, compose, helper

    if rule not in FUSED_RULES:
        raise ValueError(f"rule {rule!r} has no fused form; fused rules: {', '.join(FUSED_RULES)}")
    E = len(segments)
    models = [compose.add_prefix(onnx.load_from_string(b), f"s{k}/") for k, b in enumerate(segments)]
    # Each segment's weights live in the (sub)graph that runs it. Held at the top level, every
    # weight of the deeper segments would be an outer-scope input of each If on the way, which
    # onnxruntime hands to the branch on every call (a ViT: ~7 us per level at batch 1).
    weights = [list(m.graph.initializer) for m in models]
    C = num_classes
    const = []  # constants shared by every exit (top-level initializers)

    def add_const(name, dtype, dims, values):
        const.append(helper.make_tensor(name, dtype, dims, values))
        return name

    axes_last = add_const("c/axes_last", TensorProto.INT64, [1], [-1])
    add_const("c/zero_f", TensorProto.FLOAT, [], [0.0])
    if batched:
        flat = add_const("c/flat", TensorProto.INT64, [1], [-1])
        zero_i = add_const("c/zero_i", TensorProto.INT64, [], [0])

    def wiring(k: int, rows: str | None = None) -> list:
        """Segment k fed from segment k-1's outputs (from the graph's input for k = 0): all of
        them, by reading them under their own names (segment k's nodes renamed; an Identity per
        input where a node holds a subgraph), or only the rows ``rows`` (Gather, in the batched
        graph)."""
        if k == 0:
            pairs = [("input", "s0/input")]
        else:
            pairs = [(f"s{k - 1}/state_out_{i}", f"s{k}/{spec['name']}")
                     for i, spec in enumerate(s for s in specs[k]["inputs"] if s["name"] != "prev_logits")]
            if specs[k]["cascade"]:
                pairs.append((f"s{k - 1}/logits", f"s{k}/prev_logits"))
        if rows is not None:
            return [helper.make_node("Gather", [a, rows], [b], axis=0) for a, b in pairs]
        nodes = models[k].graph.node
        if (any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in nodes for a in n.attribute)
                or {o.name for o in models[k].graph.output} & {b for _, b in pairs}):  # an input passed straight out
            return [helper.make_node("Identity", [a], [b]) for a, b in pairs]
        to = {b: a for a, b in pairs}
        for n in nodes:  # one operator less per input at every level a sample passes
            n.input[:] = [to.get(i, i) for i in n.input]
        return []

    def answer(k: int, tag: str, per_row: bool = False, probs: str | None = None) -> tuple[list, list[str]]:
        """Nodes computing exit k's answer: (prediction, exit, probs); ``per_row``: the exit
        number repeated for every row (ArgMax's output * 0 + k) rather than the [1] constant;
        ``probs``: the exit's softmax where the rule already computed it."""
        p = f"a{k}{tag}/"
        exit_name = add_const(f"c/exit_{k}", TensorProto.INT64, [1], [k])
        nodes = [helper.make_node("ArgMax", [f"s{k}/logits"], [p + "prediction"], axis=-1, keepdims=0)]
        if per_row:
            nodes += [helper.make_node("Mul", [p + "prediction", zero_i], [p + "zeros"]),
                      helper.make_node("Add", [p + "zeros", exit_name], [p + "exit"])]
        if probs is None:
            probs = p + "probs"
            nodes.append(helper.make_node("Softmax", [f"s{k}/logits"], [probs], axis=-1))
        return nodes, [p + "prediction", p + "exit" if per_row else exit_name, probs]

    def softmax_of(k: int) -> str | None:
        """The name under which :func:`fires` leaves exit k's softmax (None: the rule has none)."""
        return None if rule == "gate" else f"d{k}/p"

    def fires(k: int) -> tuple[list, str]:
        """Nodes computing whether exit k's score fires against ``thresholds[k]`` (a [1] bool)."""
        p = f"d{k}/"
        idx = add_const(f"c/index_{k}", TensorProto.INT64, [1], [k])
        nodes = [helper.make_node("Gather", ["thresholds", idx], [p + "th"], axis=0)]
        lg = f"s{k}/logits"
        if rule == "gate":
            nodes.append(helper.make_node("Greater", [f"s{k}/gate", p + "th"], [p + "fire"]))
            return nodes, p + "fire"
        nodes.append(helper.make_node("Softmax", [lg], [p + "p"], axis=-1))
        if rule == "max_prob":
            nodes += [helper.make_node("ReduceMax", [p + "p", axes_last], [p + "score"], keepdims=0)
                      if opset >= 18 else helper.make_node("ReduceMax", [p + "p"], [p + "score"], axes=[-1], keepdims=0),
                      helper.make_node("GreaterOrEqual", [p + "score", p + "th"], [p + "fire"])]
        elif rule == "margin":
            k2 = add_const("c/two", TensorProto.INT64, [1], [2]) if "c/two" not in {c.name for c in const} else "c/two"
            nodes += [helper.make_node("TopK", [p + "p", k2], [p + "top", p + "topi"], axis=-1),
                      helper.make_node("Split", [p + "top"], [p + "t0", p + "t1"], axis=-1, num_outputs=2)
                      if opset >= 18 else helper.make_node("Split", [p + "top"], [p + "t0", p + "t1"], axis=-1),
                      helper.make_node("Sub", [p + "t0", p + "t1"], [p + "m"]),
                      helper.make_node("Squeeze", [p + "m", axes_last], [p + "score"]),
                      helper.make_node("GreaterOrEqual", [p + "score", p + "th"], [p + "fire"])]
        else:  # entropy, in nats; 0 log 0 = 0
            nodes += [helper.make_node("LogSoftmax", [lg], [p + "logp"], axis=-1),
                      helper.make_node("Mul", [p + "p", p + "logp"], [p + "plogp"]),
                      helper.make_node("IsNaN", [p + "plogp"], [p + "nan"]),
                      helper.make_node("Where", [p + "nan", "c/zero_f", p + "plogp"], [p + "plogp0"]),
                      helper.make_node("ReduceSum", [p + "plogp0", axes_last], [p + "negh"], keepdims=0),
                      helper.make_node("Neg", [p + "negh"], [p + "score"]),
                      helper.make_node("Less", [p + "score", p + "th"], [p + "fire"])]
        return nodes, p + "fire"

    out_info = [helper.make_tensor_value_info("prediction", TensorProto.INT64, [None]),
                helper.make_tensor_value_info("exit", TensorProto.INT64, [None]),
                helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, C])]

    def renamed(info, name: str):
        """A copy of the value info ``info`` under ``name``."""
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(info)
        vi.name = name
        return vi

    def branch_outputs(names: list[str], tag: str, body: Sequence = ()) -> tuple[list, list]:
        """A branch's answer as its outputs: the values its ``body`` nodes compute (already uniquely
        named) as they are, the others (outer-scope values, which onnxruntime does not let a branch
        return) through an Identity under a unique name; and their value infos."""
        inner = {o for n in body for o in n.output}
        nodes, outs = [], []
        for n, info in zip(names, out_info):
            if n not in inner:
                nodes.append(helper.make_node("Identity", [n], [f"{tag}/{info.name}"]))
                n = f"{tag}/{info.name}"
            outs.append(renamed(info, n))
        return nodes, outs

    def if_outputs(k: int, tag: str) -> list[str]:
        """The outputs of level k's If: the graph's own at the top, else unique names."""
        return [info.name if k == 0 else f"{tag}{k}/{info.name}" for info in out_info]

    def from_exit(k: int) -> tuple[list, list[str]]:
        """The nodes that run segment k onwards and the names of the answer they produce
        (batch 1: the sample either leaves at exit k or goes on)."""
        nodes = wiring(k) + list(models[k].graph.node)
        if k == E - 1:
            a_nodes, names = answer(k, "")
            return nodes + a_nodes, names
        f_nodes, fire = fires(k)
        then_nodes, then_names = answer(k, "t", probs=softmax_of(k))
        t_ren, t_infos = branch_outputs(then_names, f"then{k}", then_nodes)
        else_nodes, else_names = from_exit(k + 1)
        e_ren, e_infos = branch_outputs(else_names, f"else{k}", else_nodes)
        then_graph = helper.make_graph(then_nodes + t_ren, f"exit{k}", [], t_infos)
        else_graph = helper.make_graph(else_nodes + e_ren, f"after{k}", [], e_infos, initializer=weights[k + 1])
        outs = if_outputs(k, "if")
        node = helper.make_node("If", [fire], outs, then_branch=then_graph, else_branch=else_graph)
        return nodes + f_nodes + [node], outs

    def level(k: int, rows: str | None = None) -> tuple[list, list[str]]:
        """A batch at segment k (the rows ``rows`` of segment k-1's outputs): every sample gets
        exit k's answer; if some do not fire, those rows go on (gathered) and their deeper
        answers are scattered back over exit k's."""
        nodes = wiring(k, rows) + list(models[k].graph.node)
        if k == E - 1:
            a_nodes, names = answer(k, "", per_row=True)
            return nodes + a_nodes, names
        p = f"b{k}/"
        f_nodes, fire = fires(k)
        a_nodes, names = answer(k, "", per_row=True, probs=softmax_of(k))
        nodes += f_nodes + a_nodes + [
            helper.make_node("Reshape", [fire, flat], [p + "fire"]),
            helper.make_node("Not", [p + "fire"], [p + "go"]),
            helper.make_node("NonZero", [p + "go"], [p + "nz"]),
            helper.make_node("Reshape", [p + "nz", flat], [p + "stay"]),  # rows going on, in order
            helper.make_node("Size", [p + "stay"], [p + "count"]),
            helper.make_node("Greater", [p + "count", zero_i], [p + "cond"])]
        deep_nodes, deep_names = level(k + 1, p + "stay")
        rows = p + "rows"
        deep_nodes.append(helper.make_node("Unsqueeze", [p + "stay", axes_last], [rows]) if opset >= 13
                          else helper.make_node("Unsqueeze", [p + "stay"], [rows], axes=[-1]))
        # the branch's outputs, under unique names
        merged = [helper.make_node("ScatterND", [n, rows, d], [f"deep{k}/{info.name}"])
                  for n, d, info in zip(names, deep_names, out_info)]
        d_infos = [renamed(info, f"deep{k}/{info.name}") for info in out_info]
        s_ren, s_infos = branch_outputs(names, f"here{k}")
        deep = helper.make_graph(deep_nodes + merged, f"after{k}", [], d_infos, initializer=weights[k + 1])
        here = helper.make_graph(s_ren, f"exit{k}", [], s_infos)
        outs = if_outputs(k, "lvl")
        return nodes + [helper.make_node("If", [p + "cond"], outs, then_branch=deep, else_branch=here)], outs

    body, names = level(0) if batched else from_exit(0)
    if E == 1:  # otherwise the top If already writes the graph's outputs
        body += [helper.make_node("Identity", [n], [info.name]) for n, info in zip(names, out_info)]
    x_info = renamed(onnx.load_from_string(segments[0]).graph.input[0], "input")
    th_info = helper.make_tensor_value_info("thresholds", TensorProto.FLOAT, [max(E - 1, 1)])
    graph = helper.make_graph(body, "eenn_fused_batched" if batched else "eenn_fused_batch1", [x_info, th_info],
                              out_info, initializer=weights[0] + const)
    domains = {"": opset}
    for m in models:  # segments optimised by onnxruntime also use its own operator domains
        for o in m.opset_import:
            domains[o.domain] = max(domains.get(o.domain, 0), o.version)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(k, v) for k, v in domains.items()],
                              producer_name="eenn", ir_version=max(m.ir_version for m in models))
    if set(domains) == {""}:
        onnx.checker.check_model(model)
    return model.SerializeToString()
