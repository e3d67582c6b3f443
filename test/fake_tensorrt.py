"""A faithful fake of the TensorRT 10 builder API surface `vlsi_model.export.tensorrt_build` uses.

TensorRT cannot be installed here (ENVIRONMENT.md), so without this the builder's network flags,
optimisation profiles, FP32 pinning, DLA guard and return-value checks would run only on a
Jetson. Names, enum members and call signatures follow the TensorRT 10.3 Python bindings
(`tensorrt.Builder`, `INetworkDefinition`, `OnnxParser`, `IBuilderConfig`,
`IOptimizationProfile`, `ILayer` and its `IElementWiseLayer` / `IUnaryLayer` downcasts); the
behaviour is what the bindings document for what the builder calls: `add_optimization_profile`
returns -1 for an invalid profile, `build_serialized_network` returns a buffer (here: JSON of
what was asked, so tests can read the build back), `OnnxParser.parse_from_file` reads the ONNX
graph (one layer per node, typed as TensorRT's parser maps the common operators).

Not faked: kernels, the runtime and CUDA. The real-TensorRT test in test_tensorrt_build.py
runs wherever TensorRT exists.
"""

from __future__ import annotations

import enum
import json
from typing import Any

__version__ = "10.3.0-fake"


class Logger:
    WARNING = 2
    INFO = 3

    def __init__(self, severity: int = WARNING) -> None:
        self.severity = severity


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0  # deprecated and implied in TensorRT 10
    STRONGLY_TYPED = 1


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class BuilderFlag(enum.IntEnum):
    FP16 = 0
    INT8 = 1
    GPU_FALLBACK = 5
    PREFER_PRECISION_CONSTRAINTS = 13


class DeviceType(enum.IntEnum):
    GPU = 0
    DLA = 1


class LayerType(enum.IntEnum):
    CONVOLUTION = 0
    ACTIVATION = 2
    ELEMENTWISE = 5
    SOFTMAX = 8
    UNARY = 10
    REDUCE = 12
    SHUFFLE = 13
    MATRIX_MULTIPLY = 16
    IDENTITY = 20
    CONSTANT = 19
    GATHER = 17
    CAST = 40


class ElementWiseOperation(enum.IntEnum):
    SUM = 0
    PROD = 1
    MAX = 2
    MIN = 3
    SUB = 4
    DIV = 5
    POW = 6


class UnaryOperation(enum.IntEnum):
    EXP = 0
    SQRT = 2
    RECIP = 3
    NEG = 6
    COS = 10
    SIN = 11


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3


float32 = DataType.FLOAT
float16 = DataType.HALF

_ELEMENTWISE = {"Add": ElementWiseOperation.SUM, "Mul": ElementWiseOperation.PROD, "Sub": ElementWiseOperation.SUB,
                "Div": ElementWiseOperation.DIV, "Pow": ElementWiseOperation.POW, "Max": ElementWiseOperation.MAX,
                "Min": ElementWiseOperation.MIN}
_UNARY = {"Sqrt": UnaryOperation.SQRT, "Reciprocal": UnaryOperation.RECIP, "Exp": UnaryOperation.EXP,
          "Neg": UnaryOperation.NEG, "Cos": UnaryOperation.COS, "Sin": UnaryOperation.SIN}
_OTHER = {"Softmax": LayerType.SOFTMAX, "MatMul": LayerType.MATRIX_MULTIPLY, "Gather": LayerType.GATHER,
          "Cast": LayerType.CAST, "Constant": LayerType.CONSTANT, "Reshape": LayerType.SHUFFLE,
          "Transpose": LayerType.SHUFFLE}


class ITensor:
    def __init__(self, name: str) -> None:
        self.name = name


class ILayer:
    def __init__(self, name: str, layer_type: LayerType, inputs: list[str], outputs: list[str], op: Any = None) -> None:
        self.name = name
        self.type = layer_type
        self._inputs = [ITensor(n) for n in inputs]
        self._outputs = [ITensor(n) for n in outputs]
        self._op = op
        self.precision = DataType.FLOAT
        self.precision_is_set = False
        self.output_types: dict[int, DataType] = {}

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "precision" and hasattr(self, "precision"):
            object.__setattr__(self, "precision_is_set", True)
        object.__setattr__(self, key, value)

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_input(self, index: int) -> ITensor:
        return self._inputs[index]

    def get_output(self, index: int) -> ITensor:
        return self._outputs[index]

    def set_output_type(self, index: int, dtype: DataType) -> None:
        if not 0 <= index < self.num_outputs:
            raise IndexError(index)
        self.output_types[index] = dtype


class IElementWiseLayer(ILayer):
    @property
    def op(self) -> ElementWiseOperation:
        return self._op


class IUnaryLayer(ILayer):
    @property
    def op(self) -> UnaryOperation:
        return self._op


class INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self._layers: list[ILayer] = []
        self.input_names: list[str] = []

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def get_layer(self, index: int) -> ILayer:
        return self._layers[index]


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
        self.network = network
        self._errors: list[str] = []

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> str:
        return self._errors[index]

    def parse_from_file(self, path: str) -> bool:
        import onnx

        try:
            model = onnx.load(path, load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - the parser reports, it does not raise
            self._errors.append(f"cannot read {path}: {exc}")
            return False
        self.network.input_names = [i.name for i in model.graph.input]
        for k, node in enumerate(model.graph.node):
            name = node.name or f"{node.op_type}_{k}"
            if node.op_type in _ELEMENTWISE:
                layer: ILayer = ILayer(name, LayerType.ELEMENTWISE, list(node.input), list(node.output),
                                       _ELEMENTWISE[node.op_type])
            elif node.op_type in _UNARY:
                layer = ILayer(name, LayerType.UNARY, list(node.input), list(node.output), _UNARY[node.op_type])
            elif node.op_type.startswith("Reduce"):
                layer = ILayer(name, LayerType.REDUCE, list(node.input), list(node.output))
            else:
                layer = ILayer(name, _OTHER.get(node.op_type, LayerType.IDENTITY), list(node.input), list(node.output))
            self.network._layers.append(layer)
        return True


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - TensorRT's names
        self.shapes[input] = (tuple(min), tuple(opt), tuple(max))


class ITimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)

    def serialize(self) -> bytes:
        return b"fake-timing-cache:" + self.data


class IBuilderConfig:
    def __init__(self) -> None:
        self.pools: dict[int, int] = {}
        self.flags: set[BuilderFlag] = set()
        self.profiles: list[IOptimizationProfile] = []
        self.default_device_type = DeviceType.GPU
        self.DLA_core = -1
        self._cache: ITimingCache | None = None

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        self.pools[int(pool)] = int(pool_size)

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.add(flag)

    def get_flag(self, flag: BuilderFlag) -> bool:
        return flag in self.flags

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        """The new profile's index, or -1 when a shape range is invalid (min <= opt <= max per dim)."""
        for lo, opt, hi in profile.shapes.values():
            if not (len(lo) == len(opt) == len(hi)) or any(not a <= b <= c for a, b, c in zip(lo, opt, hi,
                                                                                             strict=True)):
                return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache:
        return ITimingCache(serialized_timing_cache)

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        self._cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache:
        return self._cache or ITimingCache(b"")


class IHostMemory(bytes):
    """The serialized engine: a buffer, as TensorRT's IHostMemory (buffer protocol, `nbytes`)."""

    @property
    def nbytes(self) -> int:
        return len(self)


class Builder:
    num_DLA_cores = 0  # tests set it per case (an AGX Orin has 2, an Orin Nano 0)

    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        if network.num_layers == 0:
            return None
        layers = [network.get_layer(i) for i in range(network.num_layers)]
        record = {
            "strongly_typed": bool(network.flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED))),
            "flags": sorted(f.name for f in config.flags),
            "workspace": config.pools.get(int(MemoryPoolType.WORKSPACE)),
            "device": DeviceType(config.default_device_type).name, "dla_core": config.DLA_core,
            "profiles": [{k: [list(v) for v in shapes] for k, shapes in p.shapes.items()} for p in config.profiles],
            "fp32_layers": [layer.name for layer in layers if layer.precision_is_set
                            and layer.precision == DataType.FLOAT],
        }
        return IHostMemory(json.dumps(record).encode())
