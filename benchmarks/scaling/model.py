"""The model of ``benchmarks/scale.py``: seeded, written straight into a header and one
external data file, tensor by tensor, so the generator never holds more than one weight."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

ALIGN = 64  # byte alignment of tensors in the generated data file (as bnfuse writes)


@dataclass
class ModelInfo:
    path: Path
    data_path: Path
    weight_bytes: int = 0
    tensors: int = 0
    largest_tensor: int = 0
    nodes: int = 0
    bns: int = 0
    params: int = 0
    layers: list[str] = field(default_factory=list)
    input_shape: tuple[int, ...] = ()
    gen_s: float = 0.0
    header_bytes: int = 0
    data_bytes: int = 0


def plan_dims(target_bytes: float) -> tuple[int, int]:
    """(conv channels C, dense width W) so that the weights total about ``target_bytes``.

    A quarter goes to three C->C 3x3 convolutions, the rest to six WxW dense layers plus
    the C->W and W->1000 ones.
    """
    c = max(64, round(math.sqrt(0.25 * target_bytes / (3 * 9 * 4)) / 64) * 64)
    rest = target_bytes - 4 * (3 * 9 * c * c + 16 * 9 * c)
    # 6 W^2 + (C + 1000) W = rest / 4
    a, b = 6.0, float(c + 1000)
    w = (-b + math.sqrt(b * b + 4 * a * max(rest, 0.0) / 4)) / (2 * a)
    return c, max(64, round(w / 64) * 64)


class _Writer:
    """Appends tensors to the data file and returns TensorProtos that refer to them."""

    def __init__(self, f: Any, location: str, info: ModelInfo):
        self.f, self.location, self.info = f, location, info

    def tensor(self, name: str, arr: np.ndarray) -> TensorProto:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        pad = -self.f.tell() % ALIGN
        if pad:
            self.f.write(b"\0" * pad)
        offset = self.f.tell()
        self.f.write(arr.data)
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(arr.shape))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", offset), ("length", arr.nbytes)):
            e = t.external_data.add()
            e.key, e.value = key, str(value)
        self.info.weight_bytes += arr.nbytes
        self.info.tensors += 1
        self.info.params += arr.size
        self.info.largest_tensor = max(self.info.largest_tensor, arr.nbytes)
        return t


def generate(path: Path, target_bytes: float, seed: int = 0) -> ModelInfo:
    """Write the benchmark model to ``path`` + ``<name>.data``; one weight in memory at a time.

    Conv(16->C, 3x3) -> BN -> Relu, Conv(C->C, 3x3, bias) -> BN -> Relu x3 at 4x4, global
    average pool, Flatten, Gemm(C->W, transB) -> BN -> Relu, then six W->W layers alternating
    MatMul -> Add -> BN -> Relu and Gemm(transB) -> BN -> Relu, and Gemm(W->1000) -> BN.
    He-initialized weights, BN statistics far from identity; every BN can be folded.
    """
    t0 = time.perf_counter()
    c, w = plan_dims(target_bytes)
    data_path = path.with_name(path.name + ".data")
    info = ModelInfo(path, data_path, input_shape=(2, 16, 4, 4))
    r = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []

    def weight(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        arr = r.standard_normal(shape, dtype=np.float32)
        arr *= np.float32(math.sqrt(2.0 / fan_in))
        return arr

    with open(data_path, "wb") as f:
        wr = _Writer(f, data_path.name, info)

        def add(name: str, arr: np.ndarray) -> str:
            inits.append(wr.tensor(name, arr))
            return name

        def bn(x: str, n: int, name: str) -> str:
            scale = add(f"{name}.scale", r.uniform(0.5, 1.5, n))
            bias = add(f"{name}.bias", r.normal(0, 0.1, n))
            mean = add(f"{name}.mean", r.normal(0, 0.1, n))
            var = add(f"{name}.var", r.uniform(0.5, 1.5, n))
            nodes.append(
                helper.make_node(
                    "BatchNormalization",
                    [x, scale, bias, mean, var],
                    [f"{name}.y"],
                    name=name,
                    epsilon=1e-5,
                )
            )
            info.bns += 1
            return f"{name}.y"

        def relu(x: str, name: str) -> str:
            nodes.append(helper.make_node("Relu", [x], [f"{name}.y"], name=name))
            return f"{name}.y"

        x = "x"
        cin = info.input_shape[1]
        for i in range(4):
            name = f"conv{i}"
            ins = [x, add(f"{name}.w", weight((c, cin, 3, 3), cin * 9))]
            if i > 0:
                ins.append(add(f"{name}.b", r.normal(0, 0.1, c)))
            nodes.append(helper.make_node("Conv", ins, [f"{name}.y"], name=name, pads=[1, 1, 1, 1]))
            info.layers.append(f"Conv {cin}->{c} 3x3{' +bias' if i else ''} -> BN -> Relu")
            x = relu(bn(f"{name}.y", c, f"{name}.bn"), f"{name}.relu")
            cin = c
        nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap.y"], name="gap"))
        nodes.append(helper.make_node("Flatten", ["gap.y"], ["flat.y"], name="flat"))
        info.layers.append("GlobalAveragePool -> Flatten")
        x, k = "flat.y", c
        dense = [("gemm", w)] + [("matmul" if i % 2 == 0 else "gemm", w) for i in range(6)]
        dense.append(("gemm", 1000))
        for i, (kind, n) in enumerate(dense):
            name = f"fc{i}"
            last = i == len(dense) - 1
            if kind == "gemm":
                wt = add(f"{name}.w", weight((n, k), k))
                b = add(f"{name}.b", r.normal(0, 0.1, n))
                nodes.append(
                    helper.make_node("Gemm", [x, wt, b], [f"{name}.y"], name=name, transB=1)
                )
                desc = f"Gemm(transB=1) {k}->{n} +bias"
                y = f"{name}.y"
            else:
                wt = add(f"{name}.w", weight((k, n), k))
                b = add(f"{name}.b", r.normal(0, 0.1, n))
                nodes.append(helper.make_node("MatMul", [x, wt], [f"{name}.mm"], name=name))
                nodes.append(
                    helper.make_node("Add", [f"{name}.mm", b], [f"{name}.y"], name=f"{name}.add")
                )
                desc = f"MatMul {k}->{n} -> Add"
                y = f"{name}.y"
            x = bn(y, n, f"{name}.bn")
            if not last:
                x = relu(x, f"{name}.relu")
            info.layers.append(desc + " -> BN" + ("" if last else " -> Relu"))
            k = n
        f.flush()
        os.fsync(f.fileno())

    graph = helper.make_graph(
        nodes,
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *info.input_shape[1:]])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 1000])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.producer_name = "bnfuse benchmarks/scale.py"
    info.nodes = len(nodes)
    path.write_bytes(model.SerializeToString())  # the header: weights are all external
    info.header_bytes, info.data_bytes = path.stat().st_size, data_path.stat().st_size
    info.gen_s = time.perf_counter() - t0
    return info
