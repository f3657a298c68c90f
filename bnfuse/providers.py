"""onnxruntime execution providers for ``--provider``: where the fused model will run.

The benchmark always times the CPU provider and, in addition, every provider the user
names that their onnxruntime build contains (CUDA and TensorRT come with
``onnxruntime-gpu``, OpenVINO with ``onnxruntime-openvino``). Validation is not affected:
it always runs on the CPU provider with graph optimizations disabled, so that the
comparison measures the fold and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bnfuse.errors import UsageError

__all__ = ["CPU", "check_session", "label", "resolve", "short_name"]

CPU = "CPUExecutionProvider"

#: Short names accepted by ``--provider`` (case-insensitive), besides the full names.
ALIASES = {
    "cpu": CPU,
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "qnn": "QNNExecutionProvider",
}

_SHORT = {
    "TensorrtExecutionProvider": "TensorRT",
    "OpenVINOExecutionProvider": "OpenVINO",
    "DmlExecutionProvider": "DirectML",
}

_PACKAGE_HINT = {
    "CUDAExecutionProvider": "onnxruntime-gpu",
    "TensorrtExecutionProvider": "onnxruntime-gpu (and TensorRT)",
    "OpenVINOExecutionProvider": "onnxruntime-openvino",
    "DmlExecutionProvider": "onnxruntime-directml",
    "QNNExecutionProvider": "onnxruntime-qnn",
}


def _available() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def _canonical(name: str, available: Sequence[str]) -> str:
    key = name.strip().lower()
    if key in ALIASES:
        return ALIASES[key]
    for full in [*available, *ALIASES.values()]:  # a full name, in any case
        if full.lower() in (key, key + "executionprovider"):
            return full
    raise UsageError(
        f"--provider {name}: unknown execution provider; use one of "
        f"{', '.join(sorted(set(ALIASES) - {'trt', 'directml'}))} or a full onnxruntime "
        "provider name (e.g. CUDAExecutionProvider)"
    )


def resolve(names: Sequence[str]) -> tuple[str, ...]:
    """The providers to time: the CPU provider first, then each of ``names`` once.

    Raises:
        UsageError: a name bnfuse does not know, or a provider missing from the installed
            onnxruntime build (the message names the package that brings it).
    """
    available = _available()
    out = [CPU]
    for name in names:
        full = _canonical(name, available)
        if full not in available:
            hint = _PACKAGE_HINT.get(full, "an onnxruntime build that includes it")
            raise UsageError(
                f"--provider {name}: {full} is not in this onnxruntime build "
                f"(it has {', '.join(available)}); install {hint} in place of onnxruntime"
            )
        out.append(full)
    return tuple(dict.fromkeys(out))


def short_name(provider: str) -> str:
    """``CUDAExecutionProvider`` -> ``CUDA`` (as the report's runtime labels say it)."""
    return _SHORT.get(provider, provider.removesuffix("ExecutionProvider"))


def label(provider: str, level: str) -> str:
    """The runtime label of a benchmark row. The CPU provider keeps the labels bnfuse has
    always used (``onnxruntime ORT_ENABLE_ALL``); others are named in it."""
    if provider == CPU:
        return f"onnxruntime {level}"
    return f"onnxruntime {short_name(provider)} {level}"


def session_providers(provider: str) -> list[str]:
    """The ``providers=`` list of a session on ``provider``: nodes it cannot run fall back
    to the CPU provider, as onnxruntime does for every accelerator."""
    return [CPU] if provider == CPU else [provider, CPU]


def check_session(session: Any, provider: str) -> None:
    """Raise when onnxruntime silently fell back to the CPU: a provider in the build can
    still fail to start (no device, missing CUDA/cuDNN libraries), and the timings would
    then be CPU timings under another name."""
    used = list(session.get_providers())
    if provider not in used:
        raise UsageError(
            f"--provider {short_name(provider)}: {provider} is in this onnxruntime build but "
            f"did not start (the session runs on {', '.join(used)}); check the device and "
            "its libraries (onnxruntime's log says which one is missing)"
        )


def for_backend(backend: str, names: Sequence[str]) -> tuple[str, ...]:
    """The providers to time for a model of ``backend`` (``"onnx"`` or ``"keras"``).

    Keras models are timed in TensorFlow, which picks its own devices: a provider other
    than the CPU one is refused for them rather than silently ignored.
    """
    if backend == "onnx":
        return resolve(names)
    others = [n for n in names if ALIASES.get(n.strip().lower(), n) != CPU]
    if others:
        raise UsageError(
            f"--provider {others[0]}: execution providers are onnxruntime's and apply to ONNX "
            "models; a Keras model is timed in TensorFlow on the devices TensorFlow sees "
            "(export it with -o model.onnx, then time that file with --provider)"
        )
    return ()
