"""A faithful fake of the TensorRT 10 API surface `vlsi_model.export.tensorrt_build` (builder) and
`vlsi_model.engine.tensorrt_engine` (runtime) use, and of the CUDA calls the runtime makes.

TensorRT cannot be installed here (ENVIRONMENT.md), so without this the builder's network flags,
optimisation profiles, FP32 pinning, DLA guard and return-value checks would run only on a
Jetson. Names, enum members and call signatures follow the TensorRT 10.3 Python bindings
(`tensorrt.Builder`, `INetworkDefinition`, `OnnxParser`, `IBuilderConfig`,
`IOptimizationProfile`, `ILayer` and its `IElementWiseLayer` / `IUnaryLayer` downcasts); the
behaviour is what the bindings document for what the builder calls: `add_optimization_profile`
returns -1 for an invalid profile, `build_serialized_network` returns a buffer (here: JSON of
what was asked, so tests can read the build back), `OnnxParser.parse_from_file` reads the ONNX
graph (one layer per node, typed as TensorRT's parser maps the common operators).

Runtime (`Runtime`, `ICudaEngine`, `IExecutionContext`, 10.3 names): a "plan" is the build
record, which names its ONNX graph; an engine reports that graph's I/O tensors (names, modes,
dtypes, -1 for dynamic dims) and the build's optimisation profiles, and a context executes the
graph with ONNX Runtime on the fake device memory (`FakeCuda`, the interface of the backend's
`_Cuda`), reading every input at the address and shape it was given and writing every output at
its address. What a real GPU would corrupt silently fails loudly here: an input shape outside
the active profile (`set_input_shape` returns False), an unset shape or address, an output
larger than its buffer or written over one of the step's inputs, and a USER_MANAGED context run
without device memory of its profile's size (`execute_async_v3` returns False).

Not faked: kernels and their precision (an engine computes in the ONNX graph's types, whatever
the build flags). The real-TensorRT test in test_tensorrt_build.py runs wherever TensorRT exists.
"""

from __future__ import annotations

import enum
import json
from typing import Any

import numpy as np

__version__ = "10.3.0-fake"
ORIN_GPU = {"name": "Orin", "compute_capability": "8.7"}  # what the fake device reports


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
    BOOL = 4
    INT64 = 8


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
        self.onnx_path = ""

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
        self.network.onnx_path = str(path)
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
            "onnx": network.onnx_path,
        }
        return IHostMemory(json.dumps(record).encode())


# ----------------------------------------------------------------------------------- runtime
class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class ExecutionContextAllocationStrategy(enum.IntEnum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


_NUMPY = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
          DataType.INT32: np.int32, DataType.BOOL: np.bool_, DataType.INT64: np.int64}
_FROM_ORT = {"tensor(float)": DataType.FLOAT, "tensor(float16)": DataType.HALF, "tensor(int8)": DataType.INT8,
             "tensor(int32)": DataType.INT32, "tensor(bool)": DataType.BOOL, "tensor(int64)": DataType.INT64}


def nptype(trt_type: DataType) -> type:
    return _NUMPY[DataType(trt_type)]


DEVICE_MEMORY: dict[int, bytearray] = {}  # the fake GPU: allocation address -> its bytes


class FakeCuda:
    """The interface of `vlsi_model.engine.tensorrt_engine._Cuda` on `DEVICE_MEMORY` (host bytes)."""

    _next = 0x10000

    def __init__(self, device_index: int = 0) -> None:
        self.stream_handle = 7
        self._allocs: list[int] = []

    def gpu_info(self) -> dict[str, Any]:
        return {**ORIN_GPU, "total_memory_mb": 7620}

    def malloc(self, nbytes: int) -> int:
        ptr = FakeCuda._next
        FakeCuda._next += max(int(nbytes), 1) + 0x1000
        DEVICE_MEMORY[ptr] = bytearray(b"\xff" * max(int(nbytes), 1))  # uninitialised, as cudaMalloc's (NaN)
        self._allocs.append(ptr)
        return ptr

    def memset(self, ptr: int, nbytes: int) -> None:
        DEVICE_MEMORY[ptr][:nbytes] = bytes(nbytes)

    def h2d(self, ptr: int, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array).tobytes()
        if len(data) > len(DEVICE_MEMORY[ptr]):
            raise AssertionError(f"copy of {len(data)} bytes into an allocation of {len(DEVICE_MEMORY[ptr])}")
        DEVICE_MEMORY[ptr][:len(data)] = data

    def d2h(self, array: np.ndarray, ptr: int) -> np.ndarray:
        array[...] = np.frombuffer(DEVICE_MEMORY[ptr], dtype=array.dtype, count=array.size).reshape(array.shape)
        return array

    def sync(self) -> None:
        pass

    def close(self) -> None:
        for ptr in self._allocs:
            DEVICE_MEMORY.pop(ptr, None)
        self._allocs.clear()


class Runtime:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine: Any) -> ICudaEngine | None:
        try:
            record = json.loads(bytes(serialized_engine))
        except ValueError:
            return None
        return ICudaEngine(record)


class ICudaEngine:
    def __init__(self, record: dict[str, Any]) -> None:
        import onnxruntime as ort

        self.record = record
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(record["onnx"], options, providers=["CPUExecutionProvider"])
        self._io = {v.name: (TensorIOMode.INPUT, v) for v in self.session.get_inputs()}
        self._io.update({v.name: (TensorIOMode.OUTPUT, v) for v in self.session.get_outputs()})
        self._names = list(self._io)

    @property
    def num_io_tensors(self) -> int:
        return len(self._names)

    @property
    def num_optimization_profiles(self) -> int:
        return max(len(self.record["profiles"]), 1)

    def get_tensor_name(self, index: int) -> str:
        return self._names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self._io[name][0] if name in self._io else TensorIOMode.NONE

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else -1 for d in self._io[name][1].shape)

    def get_tensor_dtype(self, name: str) -> DataType:
        return _FROM_ORT[self._io[name][1].type]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        return [tuple(dims) for dims in self.record["profiles"][profile_index][name]]

    def get_device_memory_size_for_profile_v2(self, profile_index: int) -> int:
        """Activation scratch: grows with the profile's largest input shapes (4 bytes per element)."""
        profiles = self.record["profiles"] or [{}]
        return 4 * sum(int(np.prod(shapes[2])) for shapes in profiles[profile_index].values()) + 1024

    @property
    def device_memory_size_v2(self) -> int:
        return max(self.get_device_memory_size_for_profile_v2(i) for i in range(self.num_optimization_profiles))

    def create_execution_context(self, strategy: ExecutionContextAllocationStrategy =
                                 ExecutionContextAllocationStrategy.STATIC) -> IExecutionContext:
        return IExecutionContext(self, ExecutionContextAllocationStrategy(strategy))


class IExecutionContext:
    def __init__(self, engine: ICudaEngine, strategy: ExecutionContextAllocationStrategy) -> None:
        self.engine = engine
        self.strategy = strategy
        self.active_optimization_profile = 0
        self.device_memory: tuple[int, int] | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}
        self.executions = 0

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        if not 0 <= profile_index < self.engine.num_optimization_profiles:
            return False
        self.active_optimization_profile = profile_index
        return True

    def set_device_memory(self, memory: int, size: int) -> None:
        if memory not in DEVICE_MEMORY or len(DEVICE_MEMORY[memory]) < size:
            raise AssertionError(f"set_device_memory({memory:#x}, {size}): not an allocation of that size")
        self.device_memory = (memory, size)

    def set_input_shape(self, name: str, shape: Any) -> bool:
        shape = tuple(int(d) for d in shape)
        static = self.engine.get_tensor_shape(name)
        if len(shape) != len(static) or any(s >= 0 and s != d for s, d in zip(static, shape, strict=True)):
            return False
        if any(s < 0 for s in static):
            lo, _, hi = self.engine.get_tensor_profile_shape(name, self.active_optimization_profile)
            if any(not a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True)):
                return False
        self._shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if name not in self.engine._io:
            return False
        self._addresses[name] = int(memory)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._shapes.get(name, self.engine.get_tensor_shape(name))

    def execute_async_v3(self, stream_handle: int) -> bool:
        engine = self.engine
        if self.strategy == ExecutionContextAllocationStrategy.USER_MANAGED and (
                self.device_memory is None or self.device_memory[1]
                < engine.get_device_memory_size_for_profile_v2(self.active_optimization_profile)):
            return False
        feeds = {}
        for name, (mode, _value) in engine._io.items():
            if mode == TensorIOMode.INPUT:
                if name not in self._shapes or name not in self._addresses:
                    return False
                dtype = np.dtype(nptype(engine.get_tensor_dtype(name)))
                count = int(np.prod(self._shapes[name]))
                feeds[name] = np.frombuffer(DEVICE_MEMORY[self._addresses[name]], dtype=dtype,
                                            count=count).reshape(self._shapes[name]).copy()
        outputs = engine.session.run(None, feeds)
        read = {self._addresses[name] for name in feeds}
        for value, out in zip(outputs, engine.session.get_outputs(), strict=True):
            ptr = self._addresses.get(out.name)
            data = np.ascontiguousarray(value).tobytes()
            if ptr is None or ptr in read or len(data) > len(DEVICE_MEMORY[ptr]):
                return False  # no buffer, an input of this step, or too small
            DEVICE_MEMORY[ptr][:len(data)] = data
            self._shapes[out.name] = tuple(value.shape)
        self.executions += 1
        return True
