"""Which ONNX operators and types TensorRT 10's ONNX parser accepts, and a checker for our graphs.

TensorRT cannot be installed on the machines that export (ENVIRONMENT.md), so an ONNX graph
that TensorRT would reject is only discovered on the Jetson, after a long build. This module
catches it at export time: `check_model` walks every node of a graph, including local
function bodies and If/Loop/Scan subgraphs, and reports operators outside TensorRT 10's
supported set, restrictions the parser enforces, and types TensorRT handles badly.

Source of the operator list: onnx/onnx-tensorrt `docs/operators.md` ("Supported ONNX
Operators", "TensorRT 10.0 supports operators in the inclusive range of opset 9 to opset
20"), every operator marked "Y", taken from the branches `10.0-GA` and `10.1-GA` and kept
only if supported in both: a graph that passes here parses on every TensorRT 10.x, i.e.
every JetPack 6.1+ (TensorRT 10.3). Operators that later 10.x releases added (e.g.
DeformConv in 10.1, opset-23 Attention / RMSNormalization / RotaryEmbedding) are left out;
extend `EXTRA_SUPPORTED_OPS` after checking the table of the TensorRT on the target.

Restrictions from the same table that are checked: the `axes` of Slice, Squeeze,
Unsqueeze, Pad and Reduce* (an input since opset 13/18) must be constants (an initializer or
a Constant node's output), as must CumSum's `axis`.

Quantization (onnx-tensorrt 10.1 `onnxOpImporters.cpp`, QuantizeLinear/DequantizeLinear): the
zero point must be absent or all zeros (symmetric only); the quantized type is INT8, INT4 or
FP8 (not UINT8/UINT4); a scale of the input's rank (blocked quantization) may block one
dimension only and only for INT4; an INT4 tensor needs an even last dimension. The parser sets no
upper opset bound (only a lower one, 7); blocked INT4 `DequantizeLinear` is opset 21, so an
opset-21 graph gets a warning (the operators.md range is 9-20), not an error.

Types (same document): TensorRT 10 supports FLOAT32/FLOAT16/BFLOAT16/INT32/INT64/INT8/BOOL
tensors; DOUBLE only by casting down with clamping, and STRING/COMPLEX/sequence/optional
types not at all. So:
- DOUBLE anywhere (initializers, graph I/O, Cast-to-double) is reported as an error: we do
  not rely on a silent narrowing.
- INT64 graph inputs/outputs are reported as warnings: TensorRT 10 accepts them, but
  MatMul, Softmax and the float math do not compute in INT64 and older tools narrow INT64 to
  INT32; our graphs take int32 index inputs. Shape arithmetic (Shape -> Gather -> Concat ->
  Reshape) stays INT64 as the ONNX spec requires; TensorRT evaluates it as shape tensors.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx

# ONNX default-domain operators marked supported ("Y") in onnx/onnx-tensorrt docs/operators.md
# of both the 10.0-GA and 10.1-GA branches.
TENSORRT10_SUPPORTED_OPS: frozenset[str] = frozenset((
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool",
    "BatchNormalization", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape",
    "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DepthToSpace", "DequantizeLinear", "Div", "Dropout", "Einsum",
    "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "GRU", "Gather", "GatherElements",
    "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual",
    "GridSample", "GroupNormalization", "HardSigmoid", "HardSwish", "Hardmax", "Identity", "If", "ImageScaler",
    "InstanceNormalization", "IsInf", "IsNaN", "LRN", "LSTM", "LayerNormalization", "LeakyRelu", "Less",
    "LessOrEqual", "Log", "LogSoftmax", "Loop", "LpNormalization", "LpPool", "MatMul", "Max", "MaxPool", "Mean",
    "MeanVarianceNormalization", "Min", "Mish", "Mod", "Mul", "Neg", "NonMaxSuppression", "NonZero", "Not", "OneHot",
    "Or", "PRelu", "Pad", "ParametricSoftplus", "Pow", "QuantizeLinear", "RNN", "RandomNormal", "RandomNormalLike",
    "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu",
    "Reshape", "Resize", "ReverseSequence", "RoiAlign", "Round", "ScaledTanh", "Scan", "Scatter", "ScatterElements",
    "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus",
    "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Tile",
    "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor",
))
# Operators to accept in addition, after checking the target TensorRT's operators.md.
EXTRA_SUPPORTED_OPS: frozenset[str] = frozenset()

_DEFAULT_DOMAINS = ("", "ai.onnx")
# op -> index of the input that must be a constant ("`axes` must be an initializer").
CONSTANT_INPUTS: dict[str, int] = {
    "Slice": 3, "Squeeze": 1, "Unsqueeze": 1, "Pad": 3, "CumSum": 1,
    **{op: 1 for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
}
_T = onnx.TensorProto
UNSUPPORTED_TYPES = {_T.DOUBLE: "DOUBLE", _T.STRING: "STRING", _T.COMPLEX64: "COMPLEX64",
                     _T.COMPLEX128: "COMPLEX128"}


@dataclass
class CompatReport:
    """What `check_model` found. `ok` is False when TensorRT 10 would reject the graph."""

    op_counts: Counter[str] = field(default_factory=Counter)
    unsupported_ops: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unsupported_ops and not self.errors

    def summary(self) -> str:
        lines = [f"{sum(self.op_counts.values())} nodes, {len(self.op_counts)} operator types: "
                 + ", ".join(sorted(self.op_counts))]
        if self.unsupported_ops:
            lines.append("NOT supported by TensorRT 10: " + ", ".join(f"{k} x{v}" for k, v in
                                                                      sorted(self.unsupported_ops.items())))
        lines += [f"error: {e}" for e in self.errors]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def iter_nodes(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.NodeProto]]:
    """Every node of the model as (where, node): main graph, subgraphs, local function bodies."""
    def walk(graph: onnx.GraphProto, where: str) -> Iterator[tuple[str, onnx.NodeProto]]:
        for node in graph.node:
            yield where, node
            for sub in _subgraphs(node):
                yield from walk(sub, f"{where}/{node.op_type}:{node.name}")

    yield from walk(model.graph, "graph")
    for fn in model.functions:
        for node in fn.node:
            yield f"function {fn.domain}.{fn.name}", node
            for sub in _subgraphs(node):
                yield from walk(sub, f"function {fn.name}/{node.op_type}")


def _elem_type(value: onnx.ValueInfoProto) -> int | None:
    t = value.type
    if t.HasField("tensor_type"):
        return t.tensor_type.elem_type
    return None


QUANTIZED_TYPES = {_T.INT8: "INT8", _T.INT4: "INT4", _T.FLOAT8E4M3FN: "FP8"}
DOCUMENTED_MAX_OPSET = 20


def _qdq_problems(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> list[str]:
    """What TensorRT's parser rejects in one QuantizeLinear / DequantizeLinear node (module docstring)."""
    from onnx import numpy_helper

    problems = []
    data, scale = inits.get(node.input[0]), inits.get(node.input[1])
    zero = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zero is not None:
        if zero.data_location == onnx.TensorProto.EXTERNAL:
            problems.append("zero point stored as external data: cannot check that it is zero")
        elif numpy_helper.to_array(zero).astype("float64").any():
            problems.append("non-zero zero point: TensorRT takes symmetric quantization only")
    qtype = (zero.data_type if zero is not None else None) if node.op_type == "QuantizeLinear" else (
        data.data_type if data is not None else None)
    if qtype is not None and qtype not in QUANTIZED_TYPES:
        problems.append(f"quantized type {onnx.TensorProto.DataType.Name(qtype)}: TensorRT takes INT8, INT4, FP8")
    if data is not None and scale is not None and len(scale.dims) == len(data.dims) > 0:
        blocked = [i for i, (a, b) in enumerate(zip(data.dims, scale.dims, strict=True)) if a != b]
        if len(blocked) > 1:
            problems.append(f"blocked along {len(blocked)} dimensions: TensorRT allows one")
        if blocked and qtype != _T.INT4:
            problems.append("blocked quantization of a non-INT4 tensor: TensorRT blocks INT4 only")
    if qtype == _T.INT4 and data is not None and data.dims and data.dims[-1] % 2:
        problems.append("INT4 tensor with an odd last dimension (TensorRT packs two per byte)")
    return problems


def check_model(model: onnx.ModelProto | str | Path, supported: frozenset[str] | None = None) -> CompatReport:
    """Check every operator and type of `model` against TensorRT 10's ONNX support."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    supported = (supported or TENSORRT10_SUPPORTED_OPS) | EXTRA_SUPPORTED_OPS
    local_functions = {(f.domain, f.name) for f in model.functions}
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for _, n in iter_nodes(model) if n.op_type == "Constant" for o in n.output}
    report = CompatReport()
    inits = {i.name: i for i in model.graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 0)
    if opset > DOCUMENTED_MAX_OPSET:
        report.warnings.append(f"opset {opset}: TensorRT 10's operators.md documents opsets 9-{DOCUMENTED_MAX_OPSET}; "
                               "its parser has no upper bound and reads opset-21 INT4 DequantizeLinear")
    for where, node in iter_nodes(model):
        report.op_counts[node.op_type] += 1
        if (node.domain, node.op_type) in local_functions:
            continue  # a call of a local function: its body is walked instead
        if node.domain not in _DEFAULT_DOMAINS:
            report.unsupported_ops[f"{node.domain}.{node.op_type}"] += 1
            continue
        if node.op_type not in supported:
            report.unsupported_ops[node.op_type] += 1
        idx = CONSTANT_INPUTS.get(node.op_type)
        if idx is not None and len(node.input) > idx and node.input[idx] and node.input[idx] not in constants:
            report.errors.append(f"{where}: {node.op_type} {node.name!r} takes input {idx} ({node.input[idx]}) from "
                                 "a computed tensor; TensorRT needs it constant (an initializer)")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            report.errors += [f"{where}: {node.op_type} {node.name!r}: {p}" for p in _qdq_problems(node, inits)]
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to in UNSUPPORTED_TYPES:
                report.errors.append(f"{where}: node {node.name or node.op_type} casts to {UNSUPPORTED_TYPES[to]}")
    graph = model.graph
    for init in graph.initializer:
        if init.data_type in UNSUPPORTED_TYPES:
            report.errors.append(f"initializer {init.name} is {UNSUPPORTED_TYPES[init.data_type]}")
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for value in values:
            elem = _elem_type(value)
            if elem is None:
                report.errors.append(f"graph {kind} {value.name} is not a tensor (sequence/optional/map)")
            elif elem in UNSUPPORTED_TYPES:
                report.errors.append(f"graph {kind} {value.name} is {UNSUPPORTED_TYPES[elem]}")
            elif elem == _T.INT64:
                report.warnings.append(f"graph {kind} {value.name} is INT64 (TensorRT computes in INT32; "
                                       "feed int32 where possible)")
    for value in graph.value_info:
        if _elem_type(value) in UNSUPPORTED_TYPES:
            report.errors.append(f"intermediate tensor {value.name} is {UNSUPPORTED_TYPES[_elem_type(value)]}")
    return report
