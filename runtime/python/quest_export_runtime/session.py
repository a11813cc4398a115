"""Runners: one lifecycle for every backend. Construct cheaply, then ``activate()``, ``infer(feed)``, ``deactivate()``
(or ``with runner:``). Feeds and outputs are ``dict[str, np.ndarray]``; nothing is loaded before ``activate()``.

- ``OnnxRuntimeRunner``: ONNX Runtime with the session options deploy.md section 4 prescribes for Q/DQ graphs
  (O-4: ``disabled_optimizers=["QDQPropagationTransformer"]``; O-5: ``session.qdq_matmulnbits_accuracy_level=0``),
  and optional initializers shared between sessions (O-7).
- ``TensorRTRunner``: a serialized TensorRT engine through the name-based tensor API (``num_io_tensors``,
  ``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``), which every TensorRT from 8.5 to 11.x has.
  ``tensorrt`` is imported at ``activate()``, never at import. Device memory and streams go through cuda-python
  (``cuda.bindings.runtime``, or ``cuda.cudart`` before cuda-python 12.6) when it is importable, else through
  Polygraphy's ctypes wrapper of libcudart (``polygraphy.cuda``); never torch or pycuda.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quest_export_runtime.device import platform_facts, require_tensorrt
from quest_export_runtime.errors import ArtifactError, InputError, ManifestMismatch, TensorRTUnavailableError

logger = logging.getLogger(__name__)

# deploy.md O-4: ORT's QDQPropagationTransformer inserts Q nodes whose zero-point type breaks session creation on
# Q/DQ graphs at EXTENDED/ALL; excluding it keeps QLinearConv fusion. Harmless on graphs without Q/DQ.
# deploy.md O-8: on x86, QDQS8ToU8Transformer rewrites S8 activations to U8, and U8S8 kernels saturate on CPUs without
# VNNI (AVX2, AVX-512 without VNNI). Measured on an AVX2 AMD EPYC, tiny UNets, W8A8 at EXTENDED (bench/ort_precision.py):
# worst cosine to the fake-quant model 0.9922 (cond) / 0.9871 (uncond) with the rewrite, 0.99998 / 1.0 without. A
# VNNI build host would also bake the rewrite into model.opt.onnx for devices without VNNI, so it is off everywhere:
# S8S8 is exact on every CPU. (session.x64quantprecision=1, ORT's U8U8 switch, is exact too but fails session
# creation on per-axis DQ graphs with zero points: tests/runtime/test_bundle.py.) Cost: fewer fused MatMuls on x86.
ORT_DISABLED_OPTIMIZERS = ("QDQPropagationTransformer", "QDQS8ToU8Transformer")
# deploy.md O-5: DQ -> MatMulNBits at EXTENDED quantizes activations internally at the default accuracy level 4
# (0.4 % error on INT8 weights); level 0 keeps float activations (<= 3e-6).
ORT_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}
# deploy.md O-3: EXTENDED gives the fused INT8 kernels; ALL adds CPU-specific layout rewrites (NCHWc).
ORT_DEFAULT_LEVEL = "ORT_ENABLE_EXTENDED"
ORT_LEVEL_ALIASES = {"disable_all": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                     "extended": "ORT_ENABLE_EXTENDED", "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}  # fmt: skip
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int16)": np.int16, "tensor(uint16)": np.uint16,
             "tensor(int32)": np.int32, "tensor(uint32)": np.uint32, "tensor(int64)": np.int64,
             "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_}  # fmt: skip


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: dtype and shape (a dimension is an int, or a name / None when dynamic)."""

    name: str
    dtype: np.dtype | None  # None: a type numpy cannot hold (e.g. INT4); not checked
    shape: tuple[int | str | None, ...]


class Runner:
    """Lifecycle shared by every backend; subclasses implement ``_activate``, ``_infer``, ``_deactivate``."""

    def __init__(self, *, name: str):
        self.name = name
        self.is_active = False
        self.inputs: dict[str, TensorSpec] = {}  # filled by activate()
        self.outputs: dict[str, TensorSpec] = {}

    def activate(self) -> Runner:
        """Load the model and allocate resources; a no-op when already active. Returns self."""
        if not self.is_active:
            try:
                self._activate()
            except BaseException:
                self._deactivate()  # release whatever was allocated before the failure
                raise
            self.is_active = True
        return self

    def deactivate(self) -> None:
        """Release every resource; the runner can be activated again."""
        if self.is_active:
            self.is_active = False
            self._deactivate()

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc: Any) -> None:
        self.deactivate()

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference.

        Args:
            feed: ``{input name: array}`` with every input, in the dtype the model declares.

        Returns:
            ``{output name: array}`` for every output.

        Raises:
            InputError: the runner is not active, or an input is missing, unknown, or has the wrong dtype or shape.
        """
        if not self.is_active:
            raise InputError(f"{self.name} is not active; use `with runner:` or call runner.activate() first")
        return self._infer(self._check_feed(feed))

    def _check_feed(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing, unknown = sorted(set(self.inputs) - set(feed)), sorted(set(feed) - set(self.inputs))
        if missing or unknown:
            raise InputError(f"{self.name}: feed is missing {missing} and has unknown {unknown}; "
                             f"the model takes {sorted(self.inputs)}")  # fmt: skip
        out = {}
        for name, spec in self.inputs.items():
            arr = np.ascontiguousarray(feed[name])
            if spec.dtype is not None and arr.dtype != spec.dtype:
                raise InputError(f"{self.name}: input '{name}' is {arr.dtype}, the model takes {spec.dtype}; "
                                 f"convert it with .astype(np.{spec.dtype.name})")  # fmt: skip
            fits = len(arr.shape) == len(spec.shape) and all(
                not isinstance(d, int) or d < 0 or d == n for d, n in zip(spec.shape, arr.shape)
            )
            if not fits:
                raise InputError(f"{self.name}: input '{name}' has shape {list(arr.shape)}, "
                                 f"the model takes {list(spec.shape)}")  # fmt: skip
            out[name] = arr
        return out

    def _activate(self) -> None:
        raise NotImplementedError

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _deactivate(self) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------- ONNX Runtime


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise InputError(f"ONNX Runtime is not importable ({e}); install it: pip install onnxruntime "
                         "(Jetson: the onnxruntime-gpu wheel of the Jetson Zoo / jetson-containers)") from None  # fmt: skip
    return onnxruntime


def _ort_level(ort, level: Any):
    if level is None:
        level = ORT_DEFAULT_LEVEL
    if isinstance(level, str):
        key = ORT_LEVEL_ALIASES.get(level.lower(), level.upper())
        if key not in ort.GraphOptimizationLevel.__members__:
            raise InputError(f"graph_optimization_level {level!r} is unknown; use one of "
                             f"{', '.join(ort.GraphOptimizationLevel.__members__)}")  # fmt: skip
        return ort.GraphOptimizationLevel.__members__[key]
    return level


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX graph in ONNX Runtime with the Q/DQ session options of deploy.md section 4."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        providers: list[Any] | None = None,
        graph_optimization_level: Any = None,
        session_options: Any = None,
        shared_initializers: Mapping[str, Any] | None = None,
        name: str | None = None,
    ):
        """Describe the session; nothing is loaded before activate().

        Args:
            path: the ONNX file (external data is read relative to it).
            providers: ONNX Runtime execution providers, first preferred. None: CUDA if this onnxruntime has it,
                else CPU. An explicitly requested provider that fails to load is an error, never a silent fallback.
            graph_optimization_level: a ``GraphOptimizationLevel``, its name, or disable_all | basic | extended |
                layout | all. None: the level of ``session_options`` if given, else ORT_ENABLE_EXTENDED (O-3).
            session_options: an ``onnxruntime.SessionOptions`` to start from (threads, profiling, ...). The O-5
                accuracy-level entry is added unless it already sets one. None: fresh options.
            shared_initializers: ``{initializer name: numpy array or OrtValue}`` to use instead of the file's copies,
                e.g. one weight set shared by per-group sessions (O-7). The values must equal the file's: at
                EXTENDED and above, kernels that rewrite weights read the file's copy.
            name: the runner's name in messages; None: the file name.
        """
        super().__init__(name=name or f"onnxruntime:{Path(path).name}")
        self.path = Path(path)
        self.providers = providers
        self.graph_optimization_level = graph_optimization_level
        self.session_options = session_options
        self.shared_initializers = shared_initializers
        self.session = None

    def _activate(self) -> None:
        ort = _import_onnxruntime()
        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: no such ONNX file; re-copy the artifact folder")
        so = self.session_options if self.session_options is not None else ort.SessionOptions()
        if self.graph_optimization_level is not None or self.session_options is None:
            so.graph_optimization_level = _ort_level(ort, self.graph_optimization_level)
        for key, value in ORT_SESSION_CONFIG.items():
            try:
                so.get_session_config_entry(key)  # the caller's own value wins
            except RuntimeError:
                so.add_session_config_entry(key, value)
        self._ortvalues = {}  # must outlive the session (O-7)
        for key, value in (self.shared_initializers or {}).items():
            if not isinstance(value, ort.OrtValue):
                value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
            self._ortvalues[key] = value
            so.add_initializer(key, value)
        available = ort.get_available_providers()
        requested = self.providers
        if requested is None:
            requested = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=so, providers=requested,
                                                disabled_optimizers=list(ORT_DISABLED_OPTIMIZERS))  # fmt: skip
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/RuntimeError types
            raise ArtifactError(f"{self.path}: ONNX Runtime {ort.__version__} cannot load it "
                                f"({type(e).__name__}: {str(e).splitlines()[0]}); re-export it or check the "
                                "onnxruntime version against the manifest's `versions`") from None  # fmt: skip
        first = requested[0] if isinstance(requested[0], str) else requested[0][0]
        used = self.session.get_providers()
        if first not in used:
            msg = f"ONNX Runtime could not enable {first} (running on {used}; available: {available})"
            if self.providers is not None:
                self.session = None
                raise InputError(f"{self.name}: {msg}; install the matching onnxruntime build or pass "
                                 "providers=['CPUExecutionProvider']")  # fmt: skip
            logger.warning("%s: %s", self.name, msg)
        logger.info("%s: providers %s, optimization level %s", self.name, used, so.graph_optimization_level)
        spec = lambda t: TensorSpec(
            t.name, np.dtype(ORT_TYPES[t.type]) if t.type in ORT_TYPES else None, tuple(t.shape)
        )
        self.inputs = {t.name: spec(t) for t in self.session.get_inputs()}
        self.outputs = {t.name: spec(t) for t in self.session.get_outputs()}

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(None, feed)
        return dict(zip(self.outputs, values))

    def _deactivate(self) -> None:
        self.session = None
        self._ortvalues = {}


def external_initializers(onnx_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Memory-mapped numpy views of the external-data initializers of an ONNX file, for ``shared_initializers``.

    Per-group exports keep one weights file for every group's graph (docs/formats.md); mapping it once and handing
    the same arrays to every session keeps one copy of the unfused weights in memory (deploy.md O-7). Needs the
    ``onnx`` package to read the graph's external-data table; tensors without a plain numpy dtype (INT4) are left to
    the file.

    Args:
        onnx_path: an ONNX file whose initializers point into external data files.

    Returns:
        ``{initializer name: read-only array}``; empty when ``onnx`` is not importable or nothing is external.
    """
    try:
        import onnx
        from onnx.helper import tensor_dtype_to_np_dtype
    except ImportError:
        logger.info("onnx is not installed: per-group sessions each load their own copy of the shared weights")
        return {}
    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    out = {}
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        try:
            dtype = np.dtype(tensor_dtype_to_np_dtype(t.data_type))
        except (KeyError, TypeError, ValueError):
            continue
        if dtype.kind not in "fiub" or dtype.names is not None or dtype.itemsize == 0:
            continue  # e.g. INT4 / FP8 stored in ml_dtypes: leave them to the file
        count = int(np.prod(t.dims, dtype=np.int64))
        if "length" in info and int(info["length"]) != count * dtype.itemsize:
            continue  # packed or padded storage: leave it to the file
        arr = np.memmap(onnx_path.parent / info["location"], dtype=dtype.newbyteorder("<"), mode="r",
                        offset=int(info.get("offset", 0)), shape=(count,))  # fmt: skip
        out[t.name] = arr.reshape(tuple(t.dims))
    return out


# ---------------------------------------------------------------------------------------------- TensorRT


class CudaRuntime:
    """The few CUDA runtime calls a TensorRT runner needs, through cuda-python or, failing that, polygraphy.cuda."""

    def __init__(self):
        """Load libcudart through cuda-python or Polygraphy.

        Raises:
            TensorRTUnavailableError: neither cuda-python nor Polygraphy's CUDA wrapper can load libcudart.
        """
        self.backend, self.rt, errors = None, None, []
        for module in ("cuda.bindings.runtime", "cuda.cudart"):
            try:
                self.rt = __import__(module, fromlist=["_"])
                self.backend = "cuda-python"
                break
            except ImportError as e:
                errors.append(f"{module}: {e}")
        if self.rt is None:
            try:
                from polygraphy import cuda as pcuda

                self.rt, self.backend = pcuda.wrapper(), "polygraphy"
                self.rt.handle.cudaGetDeviceCount  # noqa: B018 - fails here when libcudart did not load
            except Exception as e:  # Polygraphy raises its own exception type when libcudart is missing
                errors.append(f"polygraphy.cuda: {type(e).__name__}: {e}")
                raise TensorRTUnavailableError(
                    f"TensorRT needs the CUDA runtime from Python, but none loaded ({'; '.join(errors)}); "
                    f"{platform_facts()}. To proceed: pip install cuda-python (or polygraphy), with the CUDA "
                    "runtime of the TensorRT build on the loader path"
                ) from None
        logger.debug("CUDA runtime through %s", self.backend)

    def _check(self, result: Any, what: str) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(getattr(err, "value", err)) != 0:  # cudaError_t enum (cuda-python) or int (ctypes)
            raise RuntimeError(f"CUDA {what} failed with error {int(err)} ({getattr(err, 'name', '')})")
        return rest[0] if len(rest) == 1 else rest

    def compute_capability(self, device: int = 0) -> str:
        """'major.minor' of a CUDA device, e.g. '8.7'."""
        if self.backend == "cuda-python":
            attr = self.rt.cudaDeviceAttr
            major = self._check(self.rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device), "attr")
            minor = self._check(self.rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device), "attr")
            return f"{major}.{minor}"
        major, minor = ctypes.c_int(), ctypes.c_int()
        # cudaDevAttrComputeCapabilityMajor = 75, ...Minor = 76 (cuda_runtime_api.h)
        self._check(self.rt.handle.cudaDeviceGetAttribute(ctypes.byref(major), 75, device), "attr")
        self._check(self.rt.handle.cudaDeviceGetAttribute(ctypes.byref(minor), 76, device), "attr")
        return f"{major.value}.{minor.value}"

    def stream_create(self) -> Any:
        if self.backend == "cuda-python":
            return self._check(self.rt.cudaStreamCreate(), "stream create")
        return self.rt.create_stream()

    def stream_handle(self, stream: Any) -> int:
        return int(stream)

    def stream_sync(self, stream: Any) -> None:
        if self.backend == "cuda-python":
            self._check(self.rt.cudaStreamSynchronize(stream), "stream synchronize")
        else:
            self.rt.stream_synchronize(stream)

    def stream_destroy(self, stream: Any) -> None:
        if self.backend == "cuda-python":
            self._check(self.rt.cudaStreamDestroy(stream), "stream destroy")
        else:
            self.rt.destroy_stream(stream)

    def malloc(self, nbytes: int) -> int:
        if self.backend == "cuda-python":
            return int(self._check(self.rt.cudaMalloc(max(nbytes, 1)), f"malloc of {nbytes} bytes"))
        return self.rt.malloc(max(nbytes, 1))

    def free(self, ptr: int) -> None:
        if self.backend == "cuda-python":
            self._check(self.rt.cudaFree(ptr), "free")
        else:
            self.rt.free(ptr)

    def copy(self, dst: int, src: int, nbytes: int, *, to_device: bool, stream: Any) -> None:
        """Asynchronous copy host -> device (to_device) or device -> host on ``stream``."""
        if self.backend == "cuda-python":
            kind = self.rt.cudaMemcpyKind
            kind = kind.cudaMemcpyHostToDevice if to_device else kind.cudaMemcpyDeviceToHost
            self._check(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream), "memcpy")
        else:
            from polygraphy import cuda as pcuda

            kind = pcuda.MemcpyKind.HostToDevice if to_device else pcuda.MemcpyKind.DeviceToHost
            self.rt.memcpy(dst, src, nbytes, kind, stream)


def _trt_np_dtype(trt, dtype: Any) -> np.dtype:
    try:
        return np.dtype(trt.nptype(dtype))
    except (AttributeError, TypeError, KeyError):
        names = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "UINT8": np.uint8, "INT32": np.int32,
                 "INT64": np.int64, "BOOL": np.bool_}  # fmt: skip
        if getattr(dtype, "name", None) not in names:
            raise InputError(f"engine tensor type {dtype} has no numpy equivalent; export with float32 I/O") from None
        return np.dtype(names[dtype.name])


class TensorRTRunner(Runner):
    """Runs a serialized TensorRT engine (``.plan``) with the name-based tensor API of TensorRT 8.5 to 11.x."""

    def __init__(
        self, plan_path: str | os.PathLike, *, optimization_profile: int | None = None, name: str | None = None
    ):
        """Describe the engine; tensorrt is imported at activate().

        Args:
            plan_path: the serialized engine, built for this TensorRT version and GPU.
            optimization_profile: the profile to select at activation. None: profile 0.
            name: the runner's name in messages; None: the file name.
        """
        super().__init__(name=name or f"tensorrt:{Path(plan_path).name}")
        self.plan_path = Path(plan_path)
        self.optimization_profile = optimization_profile

    def _activate(self) -> None:
        trt = require_tensorrt(attempted=f"loading the TensorRT engine {self.plan_path}")
        if not self.plan_path.is_file():
            raise ArtifactError(f"{self.plan_path}: no such engine file; re-copy the engine folder")
        self.cuda = CudaRuntime()
        messages: list[str] = []

        class Logger(trt.ILogger):  # routes TensorRT's log to logging and keeps errors for our messages
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):
                if int(severity) <= int(trt.ILogger.Severity.ERROR):
                    messages.append(msg)
                    logger.error("TensorRT: %s", msg)
                elif int(severity) == int(trt.ILogger.Severity.WARNING):
                    logger.warning("TensorRT: %s", msg)
                else:
                    logger.debug("TensorRT: %s", msg)

        self._trt_logger = Logger()
        self._runtime = trt.Runtime(self._trt_logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise ManifestMismatch(f"{self.plan_path}: TensorRT {trt.__version__} cannot deserialize this engine "
                                   f"({messages[-1] if messages else 'no message'}); rebuild it on this device: "
                                   "quest-export build --from <bundle> --target <id>")  # fmt: skip
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"{self.plan_path}: TensorRT could not create an execution context ({messages[-1:]})")
        self.stream = self.cuda.stream_create()
        self.profile = self.optimization_profile or 0
        if self.profile:
            if not self.context.set_optimization_profile_async(self.profile, self.cuda.stream_handle(self.stream)):
                raise InputError(f"{self.name}: no optimization profile {self.profile} "
                                 f"(the engine has {self.engine.num_optimization_profiles})")  # fmt: skip
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        for i in range(self.engine.num_io_tensors):
            n = self.engine.get_tensor_name(i)
            spec = TensorSpec(
                n, _trt_np_dtype(trt, self.engine.get_tensor_dtype(n)), tuple(self.engine.get_tensor_shape(n))
            )
            is_input = self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs)[n] = spec
            if is_input and self.engine.is_shape_inference_io(n):
                raise ArtifactError(f"{self.plan_path}: input '{n}' is a shape tensor; UNet engines take none")

    def _device_buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self.cuda.free(ptr)
            ptr, size = self.cuda.malloc(nbytes), nbytes
            self._buffers[name] = (ptr, size)
        return ptr

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stream = self.stream
        for name, arr in feed.items():
            if not self.context.set_input_shape(name, arr.shape):
                lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
                raise InputError(f"{self.name}: input '{name}' shape {list(arr.shape)} is outside the engine's "
                                 f"profile [{list(lo)} .. {list(hi)}]; use a smaller batch or rebuild with larger "
                                 "profiles")  # fmt: skip
            ptr = self._device_buffer(name, arr.nbytes)
            self.cuda.copy(ptr, arr.ctypes.data, arr.nbytes, to_device=True, stream=stream)
            self.context.set_tensor_address(name, ptr)
        outputs = {}
        for name, spec in self.outputs.items():
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise InputError(f"{self.name}: output '{name}' shape {shape} is unresolved; check the input shapes")
            outputs[name] = np.empty(shape, dtype=spec.dtype)
            self.context.set_tensor_address(name, self._device_buffer(name, outputs[name].nbytes))
        if not self.context.execute_async_v3(self.cuda.stream_handle(stream)):
            raise RuntimeError(f"{self.name}: TensorRT execute_async_v3 failed; see the TensorRT errors logged above")
        for name, out in outputs.items():
            self.cuda.copy(out.ctypes.data, self._buffers[name][0], out.nbytes, to_device=False, stream=stream)
        self.cuda.stream_sync(stream)
        return outputs

    def _deactivate(self) -> None:  # also runs after a failed activate(): release only what exists
        for ptr, _ in getattr(self, "_buffers", {}).values():
            self.cuda.free(ptr)
        self._buffers = {}
        if getattr(self, "stream", None) is not None:
            self.cuda.stream_destroy(self.stream)
        self.stream = None
        self.context = self.engine = self._runtime = None  # context before engine before runtime


__all__ = [
    "CudaRuntime", "OnnxRuntimeRunner", "Runner", "TensorRTRunner", "TensorSpec", "external_initializers",
]  # fmt: skip
