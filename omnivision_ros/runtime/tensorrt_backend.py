"""The TensorRT backend: deserialized engines behind the Backend / DecoderSession interface.

Written against the TensorRT 10 Python API (JetPack 6: TensorRT 10.3; JetPack 7: 10.13+) and
cuda-python's runtime bindings (`cuda.bindings.runtime` in 13.x and recent 12.x, `cuda.cudart` in
older 12.x). cuda-python rather than pycuda: it is NVIDIA's binding that TensorRT's own samples use
now, it maps the CUDA runtime API one to one (so calls read like the C docs), it needs no
compiler on the Jetson and no implicit context (pycuda.autoinit), and it has CUDA-graph capture.

tensorrt and cuda are imported lazily: this module imports anywhere, and using it where they are
missing raises an OmniVisionError naming what is missing.

Memory: every device buffer is allocated once, at the engine's maximum shapes, and owned by a
DeviceBuffer freed explicitly. A session's KV cache stays on the device for the whole generation:
the graph contract returns present = past + new, so each session has two KV buffer sets and swaps
them after every call instead of copying. Only the logits come back to the host per step.
Session buffer sets are pooled by the backend: closing a session returns them for the next one
(the pipeline forks a session per question), so steady state does no cudaMalloc/cudaFree.
"""
from __future__ import annotations

import collections
import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.config import OmniVisionConfig
from omnivision_ros.runtime import trt_engines as te
from omnivision_ros.runtime.backend import Backend, DecoderSession
from omnivision_ros.model.bundle import decoder_input_names, decoder_output_names, open_bundle

TENSORRT_MISSING = (
    "the `tensorrt` Python package is not installed (on a Jetson it comes with JetPack: "
    "`sudo apt install python3-libnvinfer`, and a virtualenv needs --system-site-packages)"
)
CUDA_MISSING = (
    "the CUDA runtime bindings are not installed (pip install cuda-python matching the CUDA version: "
    "12.x on JetPack 6, 13.x on JetPack 7)"
)
GRAPH_CACHE_PER_SESSION = 512  # captured decode steps kept per pooled buffer set (cuda_graphs=True)

_cudart = None


def cudart():
    """cuda-python's CUDA runtime module: `cuda.bindings.runtime` (13.x, 12.6+), else `cuda.cudart` (older 12.x)."""
    global _cudart
    if _cudart is None:
        try:
            from cuda.bindings import runtime as rt
        except ImportError:
            try:
                from cuda import cudart as rt
            except ModuleNotFoundError as exc:
                raise OmniVisionError(CUDA_MISSING) from exc
            except Exception as exc:  # installed but broken (wrong CUDA version, missing library)
                raise OmniVisionError(f"the CUDA runtime bindings (cuda-python) do not load: {exc}") from exc
        except Exception as exc:
            raise OmniVisionError(f"the CUDA runtime bindings (cuda-python) do not load: {exc}") from exc
        _cudart = rt
    return _cudart


def import_tensorrt():
    try:
        import tensorrt as trt
    except ModuleNotFoundError as exc:
        raise OmniVisionError(TENSORRT_MISSING) from exc
    except Exception as exc:  # e.g. libnvinfer missing or from another TensorRT version
        raise OmniVisionError(f"the `tensorrt` Python package is installed but does not load: {exc}") from exc
    return trt


def cuda_check(result, what: str = "CUDA call"):
    """Unwrap a cuda-python result tuple (error, *values); raise OmniVisionError naming the error.

    Every CUDA runtime call in this package goes through here.
    """
    err, values = result[0], result[1:]
    code = int(getattr(err, "value", err))
    if code != 0:  # cudaSuccess
        try:
            name = cudart().cudaGetErrorName(err)[1]
            name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # the name is only decoration on an error already being raised
            name = str(err)
        raise OmniVisionError(f"{what} failed: {name} ({code})")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


# ---------------------------------------------------------------------------------------------
# Device, buffers, streams


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: str  # "8.7"


def gpu_info(device: int = 0) -> GpuInfo:
    """The GPU this process uses; raises OmniVisionError when no GPU is visible."""
    rt = cudart()
    try:
        count = cuda_check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
    except (OmniVisionError, RuntimeError) as exc:  # RuntimeError: cuda-python cannot reach a driver
        raise OmniVisionError(f"no CUDA GPU is visible ({exc})") from None
    if not count:
        raise OmniVisionError("no CUDA GPU is visible (cudaGetDeviceCount found 0 devices)")
    if device >= count:
        raise OmniVisionError(f"GPU {device} requested but only {count} visible")
    attr = rt.cudaDeviceAttr
    major = cuda_check(rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute")
    minor = cuda_check(rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute")
    try:
        raw = cuda_check(rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties").name
        name = raw.split(b"\0")[0].decode() if isinstance(raw, bytes) else str(raw)
    except Exception:  # the name is only for logs
        name = f"GPU {device}"
    return GpuInfo(device, name, te.format_compute_capability(int(major), int(minor)))


def probe_tensorrt() -> tuple[str, GpuInfo]:
    """(TensorRT version, GPU) when TensorRT can run here; OmniVisionError naming what is missing."""
    trt = import_tensorrt()
    cudart()
    return trt.__version__, gpu_info()


def tensorrt_status() -> tuple[bool, str]:
    """(usable, detail): whether TensorRT can run here, and what is missing or what was found."""
    try:
        version, gpu = probe_tensorrt()
    except OmniVisionError as exc:
        return False, str(exc)
    return True, f"TensorRT {version} on {gpu.name} (sm {gpu.compute_capability})"


class DeviceBuffer:
    """nbytes of device memory (cudaMalloc), released by free()."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)  # TensorRT wants a real address even for empty tensors
        self.ptr = int(cuda_check(cudart().cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})"))

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            cuda_check(cudart().cudaFree(ptr), "cudaFree")


class PinnedArray:
    """A numpy array in page-locked host memory (cudaMallocHost), so async copies are truly async."""

    def __init__(self, shape: tuple[int, ...], dtype):
        dtype = np.dtype(dtype)
        nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
        self.ptr = int(cuda_check(cudart().cudaMallocHost(nbytes), f"cudaMallocHost({nbytes})"))
        raw = np.ctypeslib.as_array(ctypes.cast(self.ptr, ctypes.POINTER(ctypes.c_uint8)), (nbytes,))
        self.array = raw[: int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            self.array = None
            cuda_check(cudart().cudaFreeHost(ptr), "cudaFreeHost")


class CudaStream:
    def __init__(self):
        self.handle = cuda_check(cudart().cudaStreamCreate(), "cudaStreamCreate")

    def synchronize(self) -> None:
        cuda_check(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def destroy(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            cuda_check(cudart().cudaStreamDestroy(handle), "cudaStreamDestroy")


def copy_to_device(dst: DeviceBuffer | int, src: np.ndarray, stream: CudaStream) -> None:
    rt = cudart()
    ptr = dst.ptr if isinstance(dst, DeviceBuffer) else dst
    cuda_check(rt.cudaMemcpyAsync(ptr, src.ctypes.data, src.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle),
               "cudaMemcpyAsync host->device")


def copy_to_host(dst: np.ndarray, src: DeviceBuffer | int, stream: CudaStream) -> None:
    rt = cudart()
    ptr = src.ptr if isinstance(src, DeviceBuffer) else src
    cuda_check(rt.cudaMemcpyAsync(dst.ctypes.data, ptr, dst.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle),
               "cudaMemcpyAsync device->host")


def copy_on_device(dst: int, src: int, nbytes: int, stream: CudaStream) -> None:
    if nbytes:
        rt = cudart()
        cuda_check(rt.cudaMemcpyAsync(dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream.handle),
                   "cudaMemcpyAsync device->device")


# ---------------------------------------------------------------------------------------------
# Engines


@dataclass(frozen=True)
class TensorSpec:
    name: str
    is_input: bool
    dtype: np.dtype
    shape: tuple[int, ...]  # -1 for dynamic dimensions


class Engine:
    """A deserialized engine with one execution context; IO described by name."""

    def __init__(self, trt, runtime, path: Path):
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise OmniVisionError(f"cannot read TensorRT engine {path}: {exc}") from exc
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise OmniVisionError(
                f"TensorRT could not load {path} (see the TensorRT error above); engines only load on the "
                "TensorRT version and GPU they were built with: rebuild with `omnivision-build-engines --force`"
            )
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise OmniVisionError(f"TensorRT could not create an execution context for {path} (out of GPU memory?)")
        self.path = path
        self.specs: dict[str, TensorSpec] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            self.specs[name] = TensorSpec(
                name,
                self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                np.dtype(trt.nptype(self.engine.get_tensor_dtype(name))),
                tuple(self.engine.get_tensor_shape(name)),
            )
        self.profile = 0  # a new context starts on profile 0

    def require(self, inputs: list[str], outputs: list[str]) -> None:
        want = {**{n: True for n in inputs}, **{n: False for n in outputs}}
        missing = [n for n in want if n not in self.specs or self.specs[n].is_input != want[n]]
        if missing:
            raise OmniVisionError(
                f"TensorRT engine {self.path} does not follow the graph contract: missing {', '.join(missing[:6])}"
            )

    def max_shape(self, name: str, profile: int) -> tuple[int, ...]:
        return tuple(self.engine.get_tensor_profile_shape(name, profile)[2])

    def select_profile(self, profile: int, stream: CudaStream) -> None:
        if profile != self.profile:
            try:
                self.context.set_optimization_profile_async(profile, stream.handle)
            except RuntimeError as exc:
                raise OmniVisionError(
                    f"TensorRT could not switch {self.path.name} to optimization profile {profile}: {exc}"
                ) from exc
            self.profile = profile

    def set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(name, shape):
            lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
            raise OmniVisionError(
                f"{self.path.name}: shape {tuple(shape)} of '{name}' is outside optimization profile {self.profile} "
                f"({tuple(lo)} .. {tuple(hi)})"
            )

    def bind(self, name: str, ptr: int) -> None:
        if not self.context.set_tensor_address(name, ptr):
            raise OmniVisionError(f"{self.path.name}: TensorRT refused the address of '{name}'")

    def execute(self, stream: CudaStream) -> None:
        if not self.context.execute_async_v3(stream.handle):
            raise OmniVisionError(f"TensorRT execution of {self.path.name} failed (see the TensorRT error above)")


class _SessionBuffers:
    """Everything one decoder session needs on the device, at maximum shapes; pooled by the backend."""

    def __init__(self, backend: "TensorRTBackend"):
        d = backend.decoder
        cfg = backend.config
        self.stream = CudaStream()
        self.graphs: collections.OrderedDict = collections.OrderedDict()  # (past, parity) -> (graph, exec)
        t = backend.max_prefill
        kv_dtype = d.specs["past_key_0"].dtype
        kv_bytes = cfg.lm_kv_heads * backend.max_context * cfg.lm_head_dim * kv_dtype.itemsize  # [1, kv, ctx, hd]
        # kv[half][2*i] = key of layer i, kv[half][2*i+1] = value; half = the set holding the past.
        self.kv = [[DeviceBuffer(kv_bytes) for _ in range(2 * cfg.lm_layers)] for _ in range(2)]
        self.ids = DeviceBuffer(t * 4)
        self.positions = DeviceBuffer(t * 4)
        self.embeds = DeviceBuffer(cfg.mp_tokens * cfg.lm_hidden * d.specs["image_embeds"].dtype.itemsize)
        self.logits = DeviceBuffer(cfg.lm_vocab * d.specs["logits"].dtype.itemsize)
        self.ids_host = PinnedArray((t,), np.int32)
        self.positions_host = PinnedArray((t,), np.int32)
        self.embeds_host = PinnedArray((cfg.mp_tokens, cfg.lm_hidden), d.specs["image_embeds"].dtype)
        self.logits_host = PinnedArray((cfg.lm_vocab,), d.specs["logits"].dtype)
        self.clear_image()
        self.stream.synchronize()

    def clear_image(self) -> None:
        """Sessions without an image still bind image_embeds: zeros, as the contract asks."""
        self.embeds_host.array[:] = 0
        copy_to_device(self.embeds, self.embeds_host.array, self.stream)

    def drop_graphs(self) -> None:
        rt = cudart()
        while self.graphs:
            _, (graph, graph_exec) = self.graphs.popitem()
            cuda_check(rt.cudaGraphExecDestroy(graph_exec), "cudaGraphExecDestroy")
            cuda_check(rt.cudaGraphDestroy(graph), "cudaGraphDestroy")

    def free(self) -> None:
        self.drop_graphs()
        for buffer in [*self.kv[0], *self.kv[1], self.ids, self.positions, self.embeds, self.logits]:
            buffer.free()
        for host in (self.ids_host, self.positions_host, self.embeds_host, self.logits_host):
            host.free()
        self.stream.destroy()


class TensorRTSession(DecoderSession):
    context_hint = " (rebuild engines with a larger --max-context)"

    def __init__(self, backend: "TensorRTBackend", buffers: _SessionBuffers, length: int = 0,
                 parity: int = 0, has_image: bool = False):
        super().__init__(backend.config, backend.max_context, length, has_image)
        self.backend = backend
        self.buffers: _SessionBuffers | None = buffers
        self.parity = parity  # which KV set holds the past

    def _run(self, ids, image_embeds):
        buffers = self.buffers
        if image_embeds is not None:
            buffers.embeds_host.array[:] = image_embeds  # cast to the engine's dtype
            copy_to_device(buffers.embeds, buffers.embeds_host.array, buffers.stream)
        logits = None
        for start, end in te.prefill_chunks(ids.size, self.backend.max_prefill):
            logits = self.backend._run(self, ids[start:end], self.length + start)
        return logits

    def _fork(self):
        return self.backend._fork(self, self.buffers)

    def _close(self):
        buffers, self.buffers = self.buffers, None
        self.backend._release(buffers)


class TensorRTBackend(Backend):
    """Vision and decoder engines of one engine folder. Calls are serialized by a lock (the
    execution contexts are shared); each session runs on its own CUDA stream."""

    name = "tensorrt"

    def __init__(self, config: OmniVisionConfig, engine_dir: Path, cuda_graphs: bool = False,
                 log: Callable[[str], None] | None = None):
        trt = import_tensorrt()
        self.config = config
        self.log = log or (lambda message: None)
        self.manifest = te.read_manifest(engine_dir)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.vision = Engine(trt, self._runtime, engine_dir / self.manifest["engines"]["vision"]["file"])
        self.decoder = Engine(trt, self._runtime, engine_dir / self.manifest["engines"]["decoder"]["file"])
        self.vision.require(["pixel_values"], ["image_embeds"])
        self.decoder.require(decoder_input_names(config), decoder_output_names(config))
        if self.decoder.engine.num_optimization_profiles != 2:
            raise OmniVisionError(
                f"{self.decoder.path} has {self.decoder.engine.num_optimization_profiles} optimization profiles, "
                "expected 2 (prefill, decode)"
            )
        self.max_cameras = self.vision.max_shape("pixel_values", 0)[0]
        self.max_prefill = self.decoder.max_shape("input_ids", te.PREFILL_PROFILE)[1]
        self.max_context = self.decoder.max_shape("past_key_0", te.DECODE_PROFILE)[2] + 1
        self.cuda_graphs = cuda_graphs
        self._closed = False
        self._lock = threading.Lock()
        self._pool_lock = threading.Lock()
        self._pool: list[_SessionBuffers] = []
        self._all: list[_SessionBuffers] = []
        # Vision IO at the maximum batch.
        s, tokens, hidden = config.vit_image_size, config.mp_tokens, config.lm_hidden
        self._stream = CudaStream()
        self._pixels_host = PinnedArray((self.max_cameras, 3, s, s), self.vision.specs["pixel_values"].dtype)
        self._embeds_host = PinnedArray((self.max_cameras, tokens, hidden), self.vision.specs["image_embeds"].dtype)
        self._pixels = DeviceBuffer(self._pixels_host.array.nbytes)
        self._embeds = DeviceBuffer(self._embeds_host.array.nbytes)
        m = self.manifest
        scratch = sum(_context_memory(e.engine) for e in (self.vision, self.decoder)) >> 20
        session = te.session_kv_bytes(config, self.max_context, self.decoder.specs["past_key_0"].dtype.itemsize) >> 20
        self.description = (
            f"TensorRT {m['tensorrt']} {m['precision']} on {m.get('gpu', '?')} (sm {m['compute_capability']}), "
            f"engines {engine_dir.name}, context {self.max_context}, {self.max_cameras} cameras per batch, "
            f"{scratch} MiB activations + {session} MiB KV cache per session" + (", CUDA graphs" if cuda_graphs else "")
        )

    # -- vision ---------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise OmniVisionError("the TensorRT backend is closed")

    def encode_images(self, pixel_values):
        self._check_open()
        pixels = np.asarray(self.check_pixels(pixel_values), dtype=np.float32)
        s = self.config.vit_image_size
        out = []
        with self._lock:
            for start in range(0, pixels.shape[0], self.max_cameras):
                chunk = pixels[start:start + self.max_cameras]
                n = chunk.shape[0]
                self._pixels_host.array[:n] = chunk
                copy_to_device(self._pixels, self._pixels_host.array[:n], self._stream)
                self.vision.set_shape("pixel_values", (n, 3, s, s))
                self.vision.bind("pixel_values", self._pixels.ptr)
                self.vision.bind("image_embeds", self._embeds.ptr)
                self.vision.execute(self._stream)
                copy_to_host(self._embeds_host.array[:n], self._embeds, self._stream)
                self._stream.synchronize()
                out.append(self._embeds_host.array[:n].astype(np.float32))
        return np.concatenate(out)

    # -- decoder --------------------------------------------------------------------------------

    def new_session(self):
        self._check_open()
        buffers = self._acquire()
        buffers.clear_image()  # a pooled set may hold the previous session's image
        return TensorRTSession(self, buffers)

    def _acquire(self) -> _SessionBuffers:
        with self._pool_lock:
            if self._pool:
                return self._pool.pop()
        buffers = _SessionBuffers(self)
        with self._pool_lock:
            self._all.append(buffers)
        return buffers

    def _release(self, buffers: _SessionBuffers) -> None:
        with self._pool_lock:
            if buffers in self._all:
                self._pool.append(buffers)

    def _fork(self, session: TensorRTSession, src: _SessionBuffers) -> TensorRTSession:
        dst = self._acquire()
        cfg = self.config
        itemsize = self.decoder.specs["past_key_0"].dtype.itemsize
        nbytes = cfg.lm_kv_heads * session.length * cfg.lm_head_dim * itemsize  # valid part of [1, kv, P, hd]
        for a, b in zip(dst.kv[0], src.kv[session.parity]):
            copy_on_device(a.ptr, b.ptr, nbytes, dst.stream)
        copy_on_device(dst.embeds.ptr, src.embeds.ptr, src.embeds.nbytes, dst.stream)
        dst.stream.synchronize()  # the source may be closed and reused as soon as we return
        return TensorRTSession(self, dst, session.length, 0, session.has_image)

    def _run(self, session: TensorRTSession, ids: np.ndarray, p: int) -> np.ndarray:
        """One engine call: ids [T] appended to the session's past of p tokens; returns fp32 logits [vocab]."""
        self._check_open()
        b = session.buffers
        t = int(ids.size)
        profile = te.choose_profile(t, p)
        b.ids_host.array[:t] = ids
        b.positions_host.array[:t] = np.arange(p, p + t, dtype=np.int32)
        with self._lock:
            copy_to_device(b.ids, b.ids_host.array[:t], b.stream)
            copy_to_device(b.positions, b.positions_host.array[:t], b.stream)
            d = self.decoder
            d.select_profile(profile, b.stream)
            key = (p, session.parity)
            replay = self.cuda_graphs and profile == te.DECODE_PROFILE and key in b.graphs
            if replay:
                b.graphs.move_to_end(key)
                cuda_check(cudart().cudaGraphLaunch(b.graphs[key][1], b.stream.handle), "cudaGraphLaunch")
            else:
                self._bind_decoder(b, t, p, session.parity)
                d.execute(b.stream)
            copy_to_host(b.logits_host.array, b.logits, b.stream)
            b.stream.synchronize()
            logits = b.logits_host.array.astype(np.float32)
            if self.cuda_graphs and profile == te.DECODE_PROFILE and not replay:
                self._capture(b, key)
        session.parity ^= 1
        return logits

    def _bind_decoder(self, b: _SessionBuffers, t: int, p: int, parity: int) -> None:
        cfg, d = self.config, self.decoder
        kv, hd = cfg.lm_kv_heads, cfg.lm_head_dim
        d.set_shape("input_ids", (1, t))
        d.set_shape("position_ids", (1, t))
        d.set_shape("image_embeds", (1, cfg.mp_tokens, cfg.lm_hidden))
        d.bind("input_ids", b.ids.ptr)
        d.bind("position_ids", b.positions.ptr)
        d.bind("image_embeds", b.embeds.ptr)
        d.bind("logits", b.logits.ptr)
        past, present = b.kv[parity], b.kv[parity ^ 1]
        for i in range(cfg.lm_layers):
            for j, kind in ((2 * i, "key"), (2 * i + 1, "value")):
                d.set_shape(f"past_{kind}_{i}", (1, kv, p, hd))
                d.bind(f"past_{kind}_{i}", past[j].ptr)
                d.bind(f"present_{kind}_{i}", present[j].ptr)

    def _capture(self, b: _SessionBuffers, key: tuple[int, int]) -> None:
        """Record the decode step just run (same shapes and addresses) as a CUDA graph for replay.

        TensorRT asks for one enqueue with the final shapes and addresses before capture: the call
        that just produced the logits is that enqueue. A graph is keyed by (past length, KV parity)
        of this buffer set; pooled buffer sets make those keys recur across questions.
        """
        rt = cudart()
        try:
            cuda_check(rt.cudaStreamBeginCapture(b.stream.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
                       "cudaStreamBeginCapture")
            ok = self.decoder.context.execute_async_v3(b.stream.handle)
            graph = cuda_check(rt.cudaStreamEndCapture(b.stream.handle), "cudaStreamEndCapture")
            if not ok:
                cuda_check(rt.cudaGraphDestroy(graph), "cudaGraphDestroy")
                raise OmniVisionError("TensorRT enqueue failed during stream capture")
            graph_exec = cuda_check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        except OmniVisionError as exc:
            self.cuda_graphs = False
            self.log(f"tensorrt: CUDA graph capture failed, continuing without graphs: {exc}")
            return
        b.graphs[key] = (graph, graph_exec)
        if len(b.graphs) > GRAPH_CACHE_PER_SESSION:
            _, (old_graph, old_exec) = b.graphs.popitem(last=False)
            cuda_check(rt.cudaGraphExecDestroy(old_exec), "cudaGraphExecDestroy")
            cuda_check(rt.cudaGraphDestroy(old_graph), "cudaGraphDestroy")

    def close(self):
        with self._lock, self._pool_lock:
            if self._closed:
                return
            self._closed = True
            for buffers in self._all:
                buffers.free()
            self._all.clear()
            self._pool.clear()
            for resource in (self._pixels, self._embeds, self._pixels_host, self._embeds_host):
                resource.free()
            if self._stream.handle is not None:
                self._stream.destroy()
            # Contexts before engines before the runtime, as TensorRT requires.
            for engine in (self.vision, self.decoder):
                engine.context = None
                engine.engine = None


def _context_memory(engine) -> int:
    """Activation memory an execution context allocates (TensorRT 10.1+ names it device_memory_size_v2)."""
    size = getattr(engine, "device_memory_size_v2", None)
    return int(size if size is not None else getattr(engine, "device_memory_size", 0))


def open_tensorrt(
    bundle_path: str | Path,
    precision: str = "fp16",
    options: te.EngineOptions | None = None,
    build: bool = True,
    cuda_graphs: bool = False,
    log: Callable[[str], None] | None = None,
) -> TensorRTBackend:
    """The TensorRT backend for a model bundle: reuse its matching engines, or build them first.

    options=None accepts engines built with any options (as `omnivision-build-engines` left them);
    build=False raises instead of building (a build takes minutes on a Jetson).
    """
    log = log or (lambda message: None)
    ok, detail = tensorrt_status()
    if not ok:
        raise OmniVisionError(f"TensorRT cannot run here: {detail}")
    bundle = open_bundle(bundle_path)
    precision = options.precision if options is not None else precision
    target = engine_target(bundle, precision)
    wanted = options.resolved(bundle.config) if options is not None else None
    root = Path(bundle_path) / te.ENGINES_DIR
    decision = te.decide(root, target, wanted)
    if decision.reuse:
        log(f"tensorrt: {decision.reason}")
    else:
        if not build:
            raise OmniVisionError(f"no usable TensorRT engines: {decision.reason}; run `omnivision-build-engines {bundle_path}`")
        from omnivision_ros.export.tensorrt_build import build_engines

        build_engines(bundle_path, wanted or te.EngineOptions(precision=precision), log=log)  # logs the decision
    return TensorRTBackend(bundle.config, root / target.key, cuda_graphs=cuda_graphs, log=log)


def engine_target(bundle, precision: str) -> te.EngineTarget:
    """The engine identity for a bundle variant on this machine's TensorRT and GPU."""
    trt = import_tensorrt()
    gpu = gpu_info()
    variant = bundle.variant(precision)  # verifies the graph files against the bundle manifest
    return te.EngineTarget(trt.__version__, gpu.compute_capability, variant.precision,
                           te.onnx_digest(variant_sources(bundle, precision)))


def variant_sources(bundle, precision: str) -> dict[str, str]:
    """{relative path: sha256} of a variant's graph and weight files, from the bundle manifest."""
    entry = bundle.manifest["variants"][precision]
    return {rel: bundle.file_sha256(rel) for rel in [entry["vision"], entry["decoder"], *entry.get("data", [])]}
