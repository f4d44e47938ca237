"""TensorRT and CUDA as this package meets them: loading, the one logger, every constructor and CUDA call
checked, and the GPU. Shared by the engine builder (export/tensorrt_build.py) and the runtime
(runtime/tensorrt_backend.py); neither imports the other.

tensorrt and cuda-python are imported lazily: this module imports anywhere, and using it where they are
missing raises an OmniVisionError naming what is missing.

How TensorRT fails, and what this module turns it into (checked against the 10.3 and 10.16 bindings):
`trt.Runtime`, `trt.Builder` and `trt.OnnxParser` raise TypeError ("factory function returned nullptr")
when the library returns null (no usable driver or GPU, out of memory); factories such as
`deserialize_cuda_engine` and `create_execution_context` return None; `set_*` and `execute_async_v3`
return False. cuda-python returns an error code per call, and raises RuntimeError when it cannot reach the
driver at all. Each of these becomes an OmniVisionError that says what to check.
"""
from __future__ import annotations

from dataclasses import dataclass

from omnivision_ros.errors import OmniVisionError

TENSORRT_MISSING = (
    "the `tensorrt` Python package is not installed (on a Jetson it comes with JetPack: "
    "`sudo apt install python3-libnvinfer`, and a virtualenv needs --system-site-packages)"
)
CUDA_MISSING = (
    "the CUDA runtime bindings are not installed (pip install cuda-python matching JetPack's CUDA: "
    "12.x on JetPack 6, 13.x on JetPack 7; see docs/jetson.md)"
)
CHECK_DRIVER = ("check that the NVIDIA driver is loaded (nvidia-smi, or tegrastats on a Jetson), that TensorRT "
                "and cuda-python belong to this JetPack (TensorRT 10.3 + cuda-python 12.x on JetPack 6.1/6.2, "
                "TensorRT 10.16 + cuda-python 13.x on JetPack 7.2), and that this user may use the GPU "
                "(the video and render groups)")
CHECK_MEMORY = ("the GPU is out of memory: close other GPU programs, build engines with a smaller --max-context, "
                "--max-prefill or --max-cameras, and on an 8 GB Orin Nano see the memory notes in docs/jetson.md")
# CUDA errors -> what to check. Others get the error's name only.
CUDA_HINTS = {
    "cudaErrorMemoryAllocation": CHECK_MEMORY,
    "cudaErrorNoDevice": CHECK_DRIVER,
    "cudaErrorInsufficientDriver": CHECK_DRIVER,
    "cudaErrorInitializationError": CHECK_DRIVER,
    "cudaErrorSystemDriverMismatch": CHECK_DRIVER,
    "cudaErrorCompatNotSupportedOnDevice": CHECK_DRIVER,
    "cudaErrorDevicesUnavailable": "another process holds the GPU exclusively; " + CHECK_DRIVER,
    "cudaErrorIllegalAddress": "a kernel touched memory it does not own; the CUDA context is now unusable: "
                               "restart the process, and report it with scripts/jetson-check.sh's report",
}

_cudart = None
_logger = None


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
                raise OmniVisionError(f"the CUDA runtime bindings (cuda-python) do not load: {exc}; "
                                      f"{CHECK_DRIVER}") from exc
        except Exception as exc:
            raise OmniVisionError(f"the CUDA runtime bindings (cuda-python) do not load: {exc}; {CHECK_DRIVER}") from exc
        _cudart = rt
    return _cudart


def import_tensorrt():
    try:
        import tensorrt as trt
    except ModuleNotFoundError as exc:
        raise OmniVisionError(TENSORRT_MISSING) from exc
    except Exception as exc:  # e.g. libnvinfer missing or from another TensorRT version
        raise OmniVisionError(f"the `tensorrt` Python package is installed but does not load: {exc}; "
                              f"{CHECK_DRIVER}") from exc
    return trt


def _error_name(err) -> str:
    try:
        name = cudart().cudaGetErrorName(err)[1]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # the name is only decoration on an error already being raised
        return str(err)


def cuda_check(result, what: str = "CUDA call"):
    """Unwrap a cuda-python result tuple (error, *values); raise OmniVisionError naming the error and what
    to check."""
    err, values = result[0], result[1:]
    code = int(getattr(err, "value", err))
    if code != 0:  # cudaSuccess
        name = _error_name(err)
        hint = CUDA_HINTS.get(name)
        raise OmniVisionError(f"{what} failed: {name} ({code})" + (f"; {hint}" if hint else ""))
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def cuda(function: str, *args, what: str | None = None):
    """Call cuda-python's runtime function `function` and check its result: every CUDA call of this package
    goes through here. cuda-python raises RuntimeError when it cannot reach the driver at all."""
    rt = cudart()
    try:
        result = getattr(rt, function)(*args)
    except (RuntimeError, OSError) as exc:
        raise OmniVisionError(f"{what or function} failed: {exc}; {CHECK_DRIVER}") from None
    return cuda_check(result, what or function)


# ---------------------------------------------------------------------------------------------
# TensorRT objects


def logger(trt=None):
    """The process's one trt.Logger. TensorRT keeps a single logger pointer for all builders and runtimes
    (a second one is ignored with a warning), and the logger must outlive every object created with it."""
    global _logger
    trt = trt or import_tensorrt()
    if _logger is None or not isinstance(_logger, trt.Logger):  # a different tensorrt module (tests) gets its own
        _logger = trt.Logger(trt.Logger.WARNING)
    return _logger


def _construct(what: str, factory, *args):
    try:
        made = factory(*args)
    except TypeError as exc:  # pybind11: "factory function returned nullptr"
        raise OmniVisionError(f"TensorRT could not create its {what} (the library returned nothing: {exc}); "
                              f"{CHECK_DRIVER}; {CHECK_MEMORY}") from None
    if made is None:
        raise OmniVisionError(f"TensorRT could not create its {what}; {CHECK_DRIVER}; {CHECK_MEMORY}")
    return made


def create_runtime(trt):
    return _construct("runtime", trt.Runtime, logger(trt))


def create_builder(trt):
    return _construct("builder", trt.Builder, logger(trt))


def create_parser(trt, network):
    return _construct("ONNX parser", trt.OnnxParser, network, logger(trt))


def checked(what: str, value):
    """A TensorRT factory's result, or an OmniVisionError when it returned None."""
    if value is None:
        raise OmniVisionError(f"TensorRT could not create {what} (see the TensorRT error above); {CHECK_MEMORY}")
    return value


# ---------------------------------------------------------------------------------------------
# The GPU and the probe


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: str  # "8.7"


@dataclass(frozen=True)
class TensorRTProbe:
    """What `probe_tensorrt` found: TensorRT's version and the GPU, with a Runtime created to prove it works."""

    version: str
    gpu: GpuInfo

    @property
    def detail(self) -> str:
        return f"TensorRT {self.version} on {self.gpu.name} (sm {self.gpu.compute_capability})"


def format_compute_capability(major: int, minor: int) -> str:
    return f"{major}.{minor}"


def gpu_info(device: int = 0) -> GpuInfo:
    """The GPU this process uses; raises OmniVisionError when no GPU is visible."""
    try:
        count = cuda("cudaGetDeviceCount")
    except OmniVisionError as exc:
        raise OmniVisionError(f"no CUDA GPU is visible ({exc})") from None
    if not count:
        raise OmniVisionError(f"no CUDA GPU is visible (cudaGetDeviceCount found 0 devices); {CHECK_DRIVER}")
    if device >= count:
        raise OmniVisionError(f"GPU {device} requested but only {count} visible")
    attr = cudart().cudaDeviceAttr
    major = cuda("cudaDeviceGetAttribute", attr.cudaDevAttrComputeCapabilityMajor, device)
    minor = cuda("cudaDeviceGetAttribute", attr.cudaDevAttrComputeCapabilityMinor, device)
    try:
        raw = cuda("cudaGetDeviceProperties", device).name
        name = raw.split(b"\0")[0].decode() if isinstance(raw, bytes) else str(raw)
    except Exception:  # the name is only for logs
        name = f"GPU {device}"
    return GpuInfo(device, name, format_compute_capability(int(major), int(minor)))


def probe_tensorrt() -> TensorRTProbe:
    """TensorRT's version and the GPU when TensorRT can run here: tensorrt and cuda-python import, a GPU is
    visible and a TensorRT Runtime can be created. OmniVisionError naming what is missing otherwise."""
    trt = import_tensorrt()
    cudart()
    gpu = gpu_info()
    create_runtime(trt)  # proves the library, driver and GPU work together, not just that they import
    return TensorRTProbe(trt.__version__, gpu)


def tensorrt_status() -> tuple[bool, str]:
    """(usable, detail): whether TensorRT can run here, and what is missing or what was found."""
    try:
        probe = probe_tensorrt()
    except OmniVisionError as exc:
        return False, str(exc)
    return True, probe.detail
