"""A simulated TensorRT 10 + cuda-python runtime: the calls this package makes, checked the way TensorRT and
CUDA check them, computing with ONNX Runtime on host memory ("device pointers" are host addresses).

It keeps CUDA's asynchronous semantics, so the backend's ordering mistakes fail tests:
- copies (cudaMemcpyAsync), engine executions (execute_async_v3) and graph launches queue on their stream
  and happen only at cudaStreamSynchronize, in order: reading a result before synchronizing reads stale
  memory, and rewriting a host buffer before its queued copy ran copies the new contents;
- every copy's kind is checked against where its pointers live (device memory from cudaMalloc, page-locked
  host memory from cudaMallocHost): a wrong direction, or a pageable host buffer, is an error;
- execution contexts follow TensorRT 10: allocation strategies, USER_MANAGED contexts refuse to run
  without `set_device_memory` of at least `device_memory_size_v2` bytes, input shapes must lie in the
  context's profile, every profile change is recorded, and two contexts sharing activation memory may not
  have executions pending on two streams at once (TensorRT: undefined behaviour);
- stream capture records executions into a graph that cudaGraphLaunch queues again;
- constructors can be made to fail as the real bindings do: `trt.Runtime` / `trt.Builder` raise TypeError
  ("factory function returned nullptr"), cudaMalloc returns cudaErrorMemoryAllocation.
"""
from __future__ import annotations

import ctypes
import json
import types

import numpy as np

ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
             "tensor(int64)": np.int64}
SUCCESS, INVALID_VALUE, MEMORY_ALLOCATION = 0, 1, 2
NULL_FACTORY = "pybind11::init(): factory function returned nullptr"


class Err(int):
    """A cudaError_t stand-in: an int with .value, as cuda-python's enums are."""

    @property
    def value(self):
        return int(self)


class Stream:
    def __init__(self):
        self.queue: list = []
        self.capturing: list | None = None


class FakeCuda:
    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice = 1, 2, 3

    class cudaDeviceAttr:
        cudaDevAttrComputeCapabilityMajor = 75
        cudaDevAttrComputeCapabilityMinor = 76

    class cudaStreamCaptureMode:
        cudaStreamCaptureModeThreadLocal = 1

    ERROR_NAMES = {INVALID_VALUE: b"cudaErrorInvalidValue", MEMORY_ALLOCATION: b"cudaErrorMemoryAllocation",
                   100: b"cudaErrorNoDevice"}

    def __init__(self):
        self.device: dict[int, ctypes.Array] = {}
        self.pinned: dict[int, ctypes.Array] = {}
        self.mallocs = self.frees = self.launches = self.syncs = 0
        self.fail_malloc_after: int | None = None  # cudaMalloc fails once this many have succeeded
        self.fail_capture = False  # cudaStreamBeginCapture fails (as under an unsupported driver)
        self.busy: dict[int, Stream] = {}  # activation memory -> the stream with an execution pending on it
        self.violations: list[str] = []
        self.streams: list[Stream] = []

    # -- memory

    def _alloc(self, table, n):
        block = ctypes.create_string_buffer(n)
        table[ctypes.addressof(block)] = block
        self.mallocs += 1
        return Err(SUCCESS), ctypes.addressof(block)

    def cudaMalloc(self, n):
        if self.fail_malloc_after is not None and self.mallocs >= self.fail_malloc_after:
            return Err(MEMORY_ALLOCATION), 0
        return self._alloc(self.device, n)

    def cudaMallocHost(self, n):
        return self._alloc(self.pinned, n)

    def _free(self, table, ptr):
        if ptr not in table:
            return (Err(INVALID_VALUE),)
        del table[ptr]
        self.frees += 1
        return (Err(SUCCESS),)

    def cudaFree(self, ptr):
        self._device_synchronize()  # cudaFree waits for the device, as the real one does
        return self._free(self.device, ptr)

    def cudaFreeHost(self, ptr):
        self._device_synchronize()
        return self._free(self.pinned, ptr)

    def _device_synchronize(self):
        for stream in self.streams:
            self.cudaStreamSynchronize(stream)

    def where(self, ptr: int, n: int) -> str | None:
        """'device' or 'pinned' when [ptr, ptr + n) lies inside one allocation, else None."""
        for kind, table in (("device", self.device), ("pinned", self.pinned)):
            for start, block in table.items():
                if start <= ptr and ptr + n <= start + ctypes.sizeof(block):
                    return kind
        return None

    # -- streams

    def cudaStreamCreate(self):
        stream = Stream()
        self.streams.append(stream)
        return Err(SUCCESS), stream

    def cudaStreamSynchronize(self, stream):
        self.syncs += 1
        queue, stream.queue = stream.queue, []
        for op in queue:
            op()
        return (Err(SUCCESS),)

    def cudaStreamDestroy(self, stream):
        result = self.cudaStreamSynchronize(stream)
        self.streams.remove(stream)
        return result

    def enqueue(self, stream: Stream, op) -> None:
        (stream.capturing if stream.capturing is not None else stream.queue).append(op)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        want = {1: ("device", "pinned"), 2: ("pinned", "device"), 3: ("device", "device")}.get(kind)
        if not isinstance(stream, Stream) or want is None or n < 0:
            return (Err(INVALID_VALUE),)
        if n and (self.where(dst, n), self.where(src, n)) != want:
            return (Err(INVALID_VALUE),)  # wrong direction, or a host buffer that is not page-locked
        self.enqueue(stream, lambda: ctypes.memmove(dst, src, n))
        return (Err(SUCCESS),)

    # -- device

    def cudaGetDeviceCount(self):
        return Err(SUCCESS), 1

    def cudaDeviceGetAttribute(self, attr, device):
        return Err(SUCCESS), 8 if attr == 75 else 7

    def cudaGetDeviceProperties(self, device):
        return Err(SUCCESS), types.SimpleNamespace(name=b"Fake Orin\0")

    def cudaGetErrorName(self, err):
        return Err(SUCCESS), self.ERROR_NAMES.get(int(err), b"cudaErrorUnknown")

    # -- graphs

    def cudaStreamBeginCapture(self, stream, mode):
        if self.fail_capture:
            return (Err(INVALID_VALUE),)
        stream.capturing = []
        return (Err(SUCCESS),)

    def cudaStreamEndCapture(self, stream):
        graph, stream.capturing = stream.capturing, None
        return Err(SUCCESS), graph

    def cudaGraphInstantiate(self, graph, flags):
        return Err(SUCCESS), list(graph)

    def cudaGraphLaunch(self, graph_exec, stream):
        self.launches += 1
        for op in graph_exec:
            self.enqueue(stream, op)
        return (Err(SUCCESS),)

    def cudaGraphExecDestroy(self, graph_exec):
        return (Err(SUCCESS),)

    cudaGraphDestroy = cudaGraphExecDestroy


def read(ptr, shape, dtype):
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if n == 0:
        return np.zeros(shape, dtype)
    return np.frombuffer((ctypes.c_char * n).from_address(ptr), dtype).reshape(shape).copy()


def make_fake_tensorrt(cuda: FakeCuda, activation_bytes: int = 1 << 16):
    import onnx
    import onnxruntime as ort

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(STATIC=0, ON_PROFILE_CHANGE=1, USER_MANAGED=2)
    trt.nptype = lambda dtype: dtype
    trt.builds = []
    trt.contexts = []
    trt.fail = set()  # constructors to fail: "Runtime", "Builder", "create_execution_context"
    trt.loggers = trt.runtimes = 0

    class Logger:
        WARNING, INFO = 2, 3

        def __init__(self, min_severity=2):
            self.min_severity = min_severity
            trt.loggers += 1

    class IProgressMonitor:
        def __init__(self):
            pass

    class Context:
        def __init__(self, engine, strategy):
            self.engine, self.strategy = engine, strategy
            self.profile, self.shapes, self.addresses = 0, {}, {}
            self.memory: int | None = None
            self.profile_calls: list[int] = []
            self.executions = 0

        def set_device_memory(self, memory, size):
            if self.strategy != trt.ExecutionContextAllocationStrategy.USER_MANAGED:
                raise RuntimeError("set_device_memory needs a USER_MANAGED context")
            if size < self.engine.device_memory_size_v2 or cuda.where(memory, size) != "device":
                raise ValueError("device memory too small or not device memory")
            self.memory = memory

        def set_optimization_profile_async(self, index, stream):
            if not 0 <= index < len(self.engine.profiles) or not isinstance(stream, Stream):
                return False
            self.profile_calls.append(index)
            self.profile, self.shapes = index, {}  # a profile change invalidates the input shapes
            return True

        def set_input_shape(self, name, shape):
            lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
            if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return False
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, ptr):
            if name not in self.engine.io or not isinstance(ptr, int) or cuda.where(ptr, 1) != "device":
                return False
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream_handle):
            if not isinstance(stream_handle, Stream):
                return False
            if self.strategy == trt.ExecutionContextAllocationStrategy.USER_MANAGED and self.memory is None:
                return False  # TensorRT: a USER_MANAGED context needs its memory before it runs
            shapes, addresses = dict(self.shapes), dict(self.addresses)
            inputs = [n for n, (is_in, _, _) in self.engine.io.items() if is_in]
            if set(inputs) - set(shapes) or set(self.engine.io) - set(addresses):
                return False  # TensorRT: all input shapes and all addresses are needed
            memory = self.memory
            owner = cuda.busy.get(memory) if memory is not None else None
            if owner is not None and owner is not stream_handle:
                cuda.violations.append("activation memory shared with a context still running on another stream")
                return False
            self.executions += 1

            def run():
                feeds = {n: read(addresses[n], shapes[n], self.engine.io[n][1]) for n in inputs}
                outs = self.engine.session.run(None, feeds)
                for out, value in zip(self.engine.session.get_outputs(), outs):
                    value = np.ascontiguousarray(value, self.engine.io[out.name][1])
                    ctypes.memmove(addresses[out.name], value.ctypes.data, value.nbytes)
                if memory is not None and cuda.busy.get(memory) is stream_handle:
                    del cuda.busy[memory]

            if memory is not None and stream_handle.capturing is None:
                cuda.busy[memory] = stream_handle
            cuda.enqueue(stream_handle, run)
            return True

    class Engine:
        def __init__(self, plan: bytes):
            header, model = plan.split(b"\n", 1)
            self.profiles = json.loads(header)["profiles"]
            self.session = ort.InferenceSession(model)
            self.io = {}
            for value, is_in in [(v, True) for v in self.session.get_inputs()] + [(v, False) for v in self.session.get_outputs()]:
                shape = tuple(d if isinstance(d, int) else -1 for d in value.shape)
                self.io[value.name] = (is_in, ORT_TYPES[value.type], shape)
            self.num_io_tensors = len(self.io)
            self.num_optimization_profiles = len(self.profiles)
            self.device_memory_size_v2 = activation_bytes

        def get_tensor_name(self, i):
            return list(self.io)[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if self.io[name][0] else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return self.io[name][1]

        def get_tensor_shape(self, name):
            return self.io[name][2]

        def get_tensor_profile_shape(self, name, profile):
            return [tuple(s) for s in self.profiles[profile][name]]

        def create_execution_context(self, strategy=0):
            if "create_execution_context" in trt.fail:
                return None
            context = Context(self, strategy)
            trt.contexts.append(context)
            return context

    class Runtime:
        def __init__(self, logger):
            if "Runtime" in trt.fail:
                raise TypeError(NULL_FACTORY)
            assert isinstance(logger, Logger)
            trt.runtimes += 1

        def deserialize_cuda_engine(self, data):
            return Engine(bytes(data)) if data.startswith(b'{"profiles"') else None

    class Network:
        inputs: list = []
        num_inputs = 0

        def get_input(self, i):
            return types.SimpleNamespace(name=self.inputs[i])

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            model = onnx.load(path)  # external data resolved next to the file, as TensorRT does
            self.network.inputs = [i.name for i in model.graph.input]
            self.network.num_inputs = len(self.network.inputs)
            self.network.model = model.SerializeToString()
            self.network.source = path
            return True

    class TimingCache:
        def serialize(self):
            return b"fake timing cache"

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            if not (len(lo) == len(opt) == len(hi)) or not all(0 <= a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise ValueError(f"bad profile for {name}")
            self.shapes[name] = [list(lo), list(opt), list(hi)]

    class Config:
        progress_monitor = None

        def __init__(self):
            self.profiles, self.cache = [], None

        def set_memory_pool_limit(self, pool, size):
            assert pool == "WORKSPACE" and size >= 64 << 20

        def create_timing_cache(self, data):
            return TimingCache()

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            self.profiles.append(profile.shapes)
            return len(self.profiles) - 1

    class Builder:
        def __init__(self, logger):
            if "Builder" in trt.fail:
                raise TypeError(NULL_FACTORY)
            assert isinstance(logger, Logger)

        def create_network(self, flags):
            assert flags == 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            assert config.cache is not None and config.profiles
            for profile in config.profiles:
                assert set(profile) == set(network.inputs)
            if config.progress_monitor is not None:
                config.progress_monitor.phase_start("Building engine", None, 2)
                assert config.progress_monitor.step_complete("Building engine", 1)
                config.progress_monitor.phase_finish("Building engine")
            trt.builds.append(network.source)
            return json.dumps({"profiles": config.profiles}).encode() + b"\n" + network.model

    trt.Logger, trt.IProgressMonitor, trt.Runtime = Logger, IProgressMonitor, Runtime
    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    return trt
