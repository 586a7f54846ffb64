"""Helpers that inspect traced computations: GPU-ready on a CPU-only machine, left alone by AutoGraph."""

from __future__ import annotations

import contextlib
from unittest import mock

import tensorflow as tf
from tensorflow.python.autograph.impl import api as autograph_api
from tensorflow.python.framework import kernels

# Devices whose kernels can run an op placed on a GPU: the GPU's own, and device-agnostic kernels
# (TensorFlow registers Assert, NoOp and many int32 shape ops as DEFAULT, which run on every device).
_GPU_DEVICE_TYPES = ("GPU", "DEFAULT")
# Graph plumbing that the placer resolves without a kernel of its own.
_NO_KERNEL_NEEDED = {"PartitionedCall", "StatefulPartitionedCall"}


def _attr_types(attr):
    return list(attr.list.type) if attr.HasField("list") else [attr.type]


def _kernel_fits(kernel, node) -> bool:
    for constraint in kernel.constraint:
        allowed = set(constraint.allowed_values.list.type)
        if constraint.name not in node.attr:
            return False
        if not set(_attr_types(node.attr[constraint.name])) <= allowed:
            return False
    return True


def all_nodes(graph_def):
    """Every node of a GraphDef, including those of the functions in its library."""
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes.extend(function.node_def)
    return nodes


def ops_without_gpu_kernel(concrete_function) -> list[str]:
    """Returns `op (attrs)` for each node of the traced graph with no GPU kernel for its dtypes."""
    missing = set()
    for node in all_nodes(concrete_function.graph.as_graph_def()):
        if node.op in _NO_KERNEL_NEEDED:
            continue
        if node.op == "Const" and node.attr["dtype"].type == tf.string.as_datatype_enum:
            continue  # assert messages: host data, which the placer keeps on the host by design
        registered = kernels.get_registered_kernels_for_op(node.op).kernel
        if not any(k.device_type in _GPU_DEVICE_TYPES and _kernel_fits(k, node) for k in registered):
            dtypes = {name: [tf.dtypes.as_dtype(t).name for t in _attr_types(attr)]
                      for name, attr in node.attr.items() if attr.HasField("type") or attr.list.type}
            missing.add(f"{node.op} {dtypes}")
    return sorted(missing)


@contextlib.contextmanager
def on_a_machine(gpu: bool):
    """Traces what a machine with a GPU (`gpu=True`) or with CPUs only traces: `tf.config.list_physical_devices`
    lists those devices.

    The graph can depend on it: `"auto"` keeps the reference where a GPU is visible, and half-precision
    gradients op by op are finished by a float32 scatter there, where a CPU-only machine uses a
    half-precision one that has no GPU kernel (`tf_seqloss._fused._gradient`).
    """
    devices = [tf.config.PhysicalDevice(name="/physical_device:CPU:0", device_type="CPU")]
    if gpu:
        devices.append(tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU"))
    with mock.patch.object(tf.config, "list_physical_devices", return_value=devices):
        yield


@contextlib.contextmanager
def converted_library_functions():
    """Yields a list that collects the `tf_seqloss` functions AutoGraph converts inside the block."""
    converted = []
    convert = autograph_api._convert_actual

    def recording(entity, program_ctx):
        module = getattr(entity, "__module__", None) or ""
        if module.split(".")[0] == "tf_seqloss" and not hasattr(entity, "autograph_info__"):
            converted.append(f"{module}.{entity.__qualname__}")
        return convert(entity, program_ctx)

    autograph_api._convert_actual = recording
    try:
        yield converted
    finally:
        autograph_api._convert_actual = convert
