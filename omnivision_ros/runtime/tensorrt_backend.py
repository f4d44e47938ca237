"""The TensorRT backend: deserialized engines behind the Backend / DecoderSession interface. It only loads
and runs engines; they are built offline (`omnivision-build-engines`) or once by the factory before it
opens this backend (runtime/factory.py), never here.

Written against the TensorRT 10 Python API (JetPack 6.1/6.2: TensorRT 10.3; JetPack 7.2: 10.16) and
cuda-python's runtime bindings (runtime/trt_env.py loads both and checks every call). cuda-python rather than
pycuda: it is NVIDIA's binding that TensorRT's own samples use now, it maps the CUDA runtime API one to one
(so calls read like the C docs), it needs no compiler on the Jetson and no implicit context
(pycuda.autoinit), and it has CUDA-graph capture.

Execution contexts: one per optimization profile, never switched. The decoder has a prefill context
(profile 0) and a decode context (profile 1), the vision engine one context; each gets its profile once, at
load. Switching one context between profiles in the hot path, and replaying a CUDA graph after such a
switch, is the pattern TensorRT Edge-LLM issue 50 reports failing with CUDA error 700; Edge-LLM 0.4.0 keeps
one context per profile, as here. The contexts are created with USER_MANAGED allocation and share one
activation buffer (`set_device_memory`, sized by the largest `device_memory_size_v2`): TensorRT forbids
only using it from two contexts at once, and every engine call here runs under the backend's lock and
ends with a stream synchronize, so they run one after another.

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
from omnivision_ros.model.bundle import decoder_input_names, decoder_output_names
from omnivision_ros.model.config import OmniVisionConfig
from omnivision_ros.runtime import trt_engines as te
from omnivision_ros.runtime.backend import Backend, DecoderSession
from omnivision_ros.runtime.trt_env import (  # noqa: F401  (re-exported: the backend's public helpers)
    GpuInfo,
    checked,
    create_runtime,
    cuda,
    cuda_check,
    cudart,
    gpu_info,
    import_tensorrt,
    probe_tensorrt,
    tensorrt_status,
)

GRAPH_CACHE_PER_SESSION = 512  # captured decode steps kept per pooled buffer set (cuda_graphs=True)


# ---------------------------------------------------------------------------------------------
# Device, buffers, streams


class DeviceBuffer:
    """nbytes of device memory (cudaMalloc, 256-byte aligned as TensorRT wants), released by free()."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)  # TensorRT wants a real address even for empty tensors
        self.ptr = int(cuda("cudaMalloc", self.nbytes, what=f"cudaMalloc({self.nbytes})"))

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            cuda("cudaFree", ptr)


class PinnedArray:
    """A numpy array in page-locked host memory (cudaMallocHost), so async copies are truly async."""

    def __init__(self, shape: tuple[int, ...], dtype):
        dtype = np.dtype(dtype)
        nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
        self.ptr = int(cuda("cudaMallocHost", nbytes, what=f"cudaMallocHost({nbytes})"))
        raw = np.ctypeslib.as_array(ctypes.cast(self.ptr, ctypes.POINTER(ctypes.c_uint8)), (nbytes,))
        self.array = raw[: int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            self.array = None
            cuda("cudaFreeHost", ptr)


class CudaStream:
    def __init__(self):
        self.handle = cuda("cudaStreamCreate")

    def synchronize(self) -> None:
        cuda("cudaStreamSynchronize", self.handle)

    def destroy(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            cuda("cudaStreamDestroy", handle)


def copy_to_device(dst: DeviceBuffer | int, src: np.ndarray, stream: CudaStream) -> None:
    """Queue a host->device copy; `src` must stay untouched until the stream is synchronized."""
    ptr = dst.ptr if isinstance(dst, DeviceBuffer) else dst
    cuda("cudaMemcpyAsync", ptr, src.ctypes.data, src.nbytes, cudart().cudaMemcpyKind.cudaMemcpyHostToDevice,
         stream.handle, what="cudaMemcpyAsync host->device")


def copy_to_host(dst: np.ndarray, src: DeviceBuffer | int, stream: CudaStream) -> None:
    """Queue a device->host copy; `dst` holds the data only after the stream is synchronized."""
    ptr = src.ptr if isinstance(src, DeviceBuffer) else src
    cuda("cudaMemcpyAsync", dst.ctypes.data, ptr, dst.nbytes, cudart().cudaMemcpyKind.cudaMemcpyDeviceToHost,
         stream.handle, what="cudaMemcpyAsync device->host")


def copy_on_device(dst: int, src: int, nbytes: int, stream: CudaStream) -> None:
    if nbytes:
        cuda("cudaMemcpyAsync", dst, src, nbytes, cudart().cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream.handle,
             what="cudaMemcpyAsync device->device")


# ---------------------------------------------------------------------------------------------
# Engines


@dataclass(frozen=True)
class TensorSpec:
    name: str
    is_input: bool
    dtype: np.dtype
    shape: tuple[int, ...]  # -1 for dynamic dimensions


class Engine:
    """A deserialized engine with one execution context per optimization profile; IO described by name.

    The contexts have no device memory of their own (USER_MANAGED): `attach` gives them the backend's shared
    activation buffer, and only then does each get its profile, once."""

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
        del data
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
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self.contexts = []
        for profile in range(self.engine.num_optimization_profiles):
            context = self.engine.create_execution_context(strategy)
            if context is None:
                raise OmniVisionError(f"TensorRT could not create an execution context for {path.name} "
                                      f"(profile {profile}; see the TensorRT error above)")
            self.contexts.append(context)

    @property
    def memory_size(self) -> int:
        """Activation memory one context needs, the most over all profiles (TensorRT 10.1+:
        device_memory_size_v2; the Python name for per-profile sizes calls the V1 function up to 10.11)."""
        size = getattr(self.engine, "device_memory_size_v2", None)
        return int(size if size is not None else self.engine.device_memory_size)

    def attach(self, memory: "DeviceBuffer", stream: CudaStream) -> None:
        """Give every context the shared activation buffer, then its profile (context i runs profile i)."""
        if memory.nbytes < self.memory_size:
            raise OmniVisionError(f"{self.path.name}: activation buffer of {memory.nbytes} bytes, "
                                  f"the engine needs {self.memory_size}")
        for profile, context in enumerate(self.contexts):
            context.set_device_memory(memory.ptr, memory.nbytes)
            if profile and not context.set_optimization_profile_async(profile, stream.handle):
                raise OmniVisionError(f"TensorRT could not set optimization profile {profile} of {self.path.name}")
        stream.synchronize()  # profile setup may copy on `stream`; sessions run on other streams

    def require(self, inputs: list[str], outputs: list[str]) -> None:
        want = {**{n: True for n in inputs}, **{n: False for n in outputs}}
        missing = [n for n in want if n not in self.specs or self.specs[n].is_input != want[n]]
        if missing:
            raise OmniVisionError(
                f"TensorRT engine {self.path} does not follow the graph contract: missing {', '.join(missing[:6])}"
            )

    def max_shape(self, name: str, profile: int) -> tuple[int, ...]:
        return tuple(self.engine.get_tensor_profile_shape(name, profile)[2])

    def set_shape(self, profile: int, name: str, shape: tuple[int, ...]) -> None:
        if not self.contexts[profile].set_input_shape(name, shape):
            lo, _, hi = self.engine.get_tensor_profile_shape(name, profile)
            raise OmniVisionError(
                f"{self.path.name}: shape {tuple(shape)} of '{name}' is outside optimization profile {profile} "
                f"({tuple(lo)} .. {tuple(hi)})"
            )

    def bind(self, profile: int, name: str, ptr: int) -> None:
        if not self.contexts[profile].set_tensor_address(name, ptr):
            raise OmniVisionError(f"{self.path.name}: TensorRT refused the address of '{name}'")

    def execute(self, profile: int, stream: CudaStream) -> None:
        if not self.contexts[profile].execute_async_v3(stream.handle):
            raise OmniVisionError(f"TensorRT execution of {self.path.name} failed (see the TensorRT error above)")

    def release(self) -> None:
        """Contexts before the engine, as TensorRT requires."""
        self.contexts = []
        self.engine = None


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

    def clear_image(self) -> None:
        """Sessions without an image still bind image_embeds: zeros, as the contract asks."""
        self.embeds_host.array[:] = 0
        copy_to_device(self.embeds, self.embeds_host.array, self.stream)
        self.stream.synchronize()  # the host buffer is reused by the next image

    def drop_graphs(self) -> None:
        while self.graphs:
            _, (graph, graph_exec) = self.graphs.popitem()
            cuda("cudaGraphExecDestroy", graph_exec)
            cuda("cudaGraphDestroy", graph)

    def free(self) -> None:
        self.stream.synchronize()  # nothing queued may still use the buffers
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


@dataclass
class GraphStats:
    """What CUDA-graph capture did (cuda_graphs=True): decode steps captured and replayed, and why capture
    stopped if it failed (the backend then runs without graphs)."""

    captured: int = 0
    replayed: int = 0
    failure: str = ""


class TensorRTBackend(Backend):
    """Vision and decoder engines of one engine folder. Calls are serialized by a lock (the execution
    contexts and their activation memory are shared); each session runs on its own CUDA stream."""

    name = "tensorrt"

    def __init__(self, config: OmniVisionConfig, engine_dir: Path, cuda_graphs: bool = False,
                 log: Callable[[str], None] | None = None):
        trt = import_tensorrt()
        self.config = config
        self.log = log or (lambda message: None)
        self.manifest = te.read_manifest(engine_dir)
        self._runtime = create_runtime(trt)  # outlives the engines it deserializes (released last)
        self.vision = Engine(trt, self._runtime, engine_dir / self.manifest["engines"]["vision"]["file"])
        self.decoder = Engine(trt, self._runtime, engine_dir / self.manifest["engines"]["decoder"]["file"])
        self.vision.require(["pixel_values"], ["image_embeds"])
        self.decoder.require(decoder_input_names(config), decoder_output_names(config))
        if len(self.decoder.contexts) != 2:
            raise OmniVisionError(
                f"{self.decoder.path} has {len(self.decoder.contexts)} optimization profiles, expected 2 (prefill, decode)"
            )
        self.max_cameras = self.vision.max_shape("pixel_values", 0)[0]
        self.max_prefill = self.decoder.max_shape("input_ids", te.PREFILL_PROFILE)[1]
        self.max_context = self.decoder.max_shape("past_key_0", te.DECODE_PROFILE)[2] + 1
        self.cuda_graphs = cuda_graphs
        self.graph_stats = GraphStats()
        self._closed = False
        self._lock = threading.Lock()
        self._pool_lock = threading.Lock()
        self._pool: list[_SessionBuffers] = []
        self._all: list[_SessionBuffers] = []
        self._stream = CudaStream()
        # One activation buffer for the three contexts: they run one at a time (under _lock, synchronized).
        self._activations = DeviceBuffer(max(self.vision.memory_size, self.decoder.memory_size))
        for engine in (self.vision, self.decoder):
            engine.attach(self._activations, self._stream)
        # Vision IO at the maximum batch.
        s, tokens, hidden = config.vit_image_size, config.mp_tokens, config.lm_hidden
        self._pixels_host = PinnedArray((self.max_cameras, 3, s, s), self.vision.specs["pixel_values"].dtype)
        self._embeds_host = PinnedArray((self.max_cameras, tokens, hidden), self.vision.specs["image_embeds"].dtype)
        self._pixels = DeviceBuffer(self._pixels_host.array.nbytes)
        self._embeds = DeviceBuffer(self._embeds_host.array.nbytes)
        m = self.manifest
        session = te.session_kv_bytes(config, self.max_context, self.decoder.specs["past_key_0"].dtype.itemsize) >> 20
        self.description = (
            f"TensorRT {m['tensorrt']} {m['precision']} on {m.get('gpu', '?')} (sm {m['compute_capability']}), "
            f"engines {engine_dir.name}, context {self.max_context}, {self.max_cameras} cameras per batch, "
            f"{self._activations.nbytes >> 20} MiB activations (shared by 3 contexts) + {session} MiB KV cache "
            "per session" + (", CUDA graphs" if cuda_graphs else "")
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
                self.vision.set_shape(0, "pixel_values", (n, 3, s, s))
                self.vision.bind(0, "pixel_values", self._pixels.ptr)
                self.vision.bind(0, "image_embeds", self._embeds.ptr)
                self.vision.execute(0, self._stream)
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
        src.stream.synchronize()  # the source's last call (or image upload) has landed
        for a, b in zip(dst.kv[0], src.kv[session.parity]):
            copy_on_device(a.ptr, b.ptr, nbytes, dst.stream)
        copy_on_device(dst.embeds.ptr, src.embeds.ptr, src.embeds.nbytes, dst.stream)
        dst.stream.synchronize()  # the source may be closed and reused as soon as we return
        return TensorRTSession(self, dst, session.length, 0, session.has_image)

    def _run(self, session: TensorRTSession, ids: np.ndarray, p: int) -> np.ndarray:
        """One engine call: ids [T] appended to the session's past of p tokens; returns fp32 logits [vocab].

        The profile decides the context (prefill or decode); neither ever switches profile."""
        self._check_open()
        b = session.buffers
        t = int(ids.size)
        profile = te.choose_profile(t, p)
        with self._lock:
            b.stream.synchronize()  # the previous call's copies out of the host buffers are done
            b.ids_host.array[:t] = ids
            b.positions_host.array[:t] = np.arange(p, p + t, dtype=np.int32)
            copy_to_device(b.ids, b.ids_host.array[:t], b.stream)
            copy_to_device(b.positions, b.positions_host.array[:t], b.stream)
            key = (p, session.parity)
            graphs = self.cuda_graphs and profile == te.DECODE_PROFILE
            replay = graphs and key in b.graphs
            if replay:
                b.graphs.move_to_end(key)
                cuda("cudaGraphLaunch", b.graphs[key][1], b.stream.handle)
                self.graph_stats.replayed += 1
            else:
                self._bind_decoder(profile, b, t, p, session.parity)
                self.decoder.execute(profile, b.stream)
            copy_to_host(b.logits_host.array, b.logits, b.stream)
            b.stream.synchronize()
            logits = b.logits_host.array.astype(np.float32)
            if graphs and not replay:
                self._capture(b, key)
        session.parity ^= 1
        return logits

    def _bind_decoder(self, profile: int, b: _SessionBuffers, t: int, p: int, parity: int) -> None:
        cfg, d = self.config, self.decoder
        kv, hd = cfg.lm_kv_heads, cfg.lm_head_dim
        d.set_shape(profile, "input_ids", (1, t))
        d.set_shape(profile, "position_ids", (1, t))
        d.set_shape(profile, "image_embeds", (1, cfg.mp_tokens, cfg.lm_hidden))
        d.bind(profile, "input_ids", b.ids.ptr)
        d.bind(profile, "position_ids", b.positions.ptr)
        d.bind(profile, "image_embeds", b.embeds.ptr)
        d.bind(profile, "logits", b.logits.ptr)
        past, present = b.kv[parity], b.kv[parity ^ 1]
        for i in range(cfg.lm_layers):
            for j, kind in ((2 * i, "key"), (2 * i + 1, "value")):
                d.set_shape(profile, f"past_{kind}_{i}", (1, kv, p, hd))
                d.bind(profile, f"past_{kind}_{i}", past[j].ptr)
                d.bind(profile, f"present_{kind}_{i}", present[j].ptr)

    def _capture(self, b: _SessionBuffers, key: tuple[int, int]) -> None:
        """Record the decode step just run (same shapes and addresses, on the decode context) as a CUDA graph.

        TensorRT asks for one enqueue with the final shapes and addresses before capture: the call that just
        produced the logits is that enqueue. A graph is keyed by (past length, KV parity) of this buffer set;
        pooled buffer sets make those keys recur across questions. Capture failing turns graphs off, with
        the reason kept in graph_stats and logged.
        """
        rt = cudart()
        try:
            cuda("cudaStreamBeginCapture", b.stream.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
            ok = self.decoder.contexts[te.DECODE_PROFILE].execute_async_v3(b.stream.handle)
            graph = cuda("cudaStreamEndCapture", b.stream.handle)
            if not ok:
                cuda("cudaGraphDestroy", graph)
                raise OmniVisionError("TensorRT enqueue failed during stream capture")
            graph_exec = cuda("cudaGraphInstantiate", graph, 0)
        except OmniVisionError as exc:
            self.cuda_graphs = False
            self.graph_stats.failure = str(exc)
            self.log(f"tensorrt: CUDA graph capture failed, continuing without graphs: {exc}")
            return
        b.graphs[key] = (graph, graph_exec)
        self.graph_stats.captured += 1
        if len(b.graphs) > GRAPH_CACHE_PER_SESSION:
            _, (old_graph, old_exec) = b.graphs.popitem(last=False)
            cuda("cudaGraphExecDestroy", old_exec)
            cuda("cudaGraphDestroy", old_graph)

    def close(self):
        with self._lock, self._pool_lock:
            if self._closed:
                return
            self._closed = True
            for buffers in self._all:
                buffers.free()
            self._all.clear()
            self._pool.clear()
            # Contexts before engines before the runtime, as TensorRT requires; then their memory.
            for engine in (self.vision, self.decoder):
                engine.release()
            self._runtime = None
            for resource in (self._pixels, self._embeds, self._pixels_host, self._embeds_host, self._activations):
                resource.free()
            if self._stream.handle is not None:
                self._stream.destroy()


def open_tensorrt(bundle, precision: str = "fp16", cuda_graphs: bool = False,
                  log: Callable[[str], None] | None = None, probe=None) -> TensorRTBackend:
    """The TensorRT backend for an opened bundle's engines of `precision` built for this TensorRT and GPU.

    Loads only: when no matching engines exist it raises, naming `omnivision-build-engines`. The factory
    (runtime/factory.py) decides whether to build them first. `probe` is the TensorRTProbe of the caller's
    check, so TensorRT and the GPU are probed once per open.
    """
    log = log or (lambda message: None)
    probe = probe or probe_tensorrt()
    target = te.engine_target(bundle, precision, probe.version, probe.gpu.compute_capability)
    root = Path(bundle.path) / te.ENGINES_DIR
    decision = te.decide(root, target, None)
    if not decision.reuse:
        raise OmniVisionError(f"no usable TensorRT engines: {decision.reason}; "
                              f"run `omnivision-build-engines {bundle.path} --precision {precision}`")
    log(f"tensorrt: {decision.reason}")
    return TensorRTBackend(bundle.config, root / target.key, cuda_graphs=cuda_graphs, log=log)
