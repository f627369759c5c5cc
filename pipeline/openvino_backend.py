"""PyTorch networks run by OpenVINO's CPU plugin, as drop-in torch modules.

A network is exported with `torch.export` and converted in memory (about 5 s for a full-size nnU-Net network;
converting the module directly traces it with real tensors and takes minutes), with a dynamic batch size: one
compiled model serves the full and the last, partial batch of tiles. Compiled models are cached in the process
by the SHA-256 of the weights, the tile shape and the precision, so each fold of a model is converted once per
process and later runs (a listener, a batch) reuse it. OpenVINO bakes the weights
into a compiled model as constants, which is part of its speed, so folds sharing an architecture get one
compiled model each rather than a weight swap. Nothing is written to disk: no cache can go stale.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import logging
import time
import warnings
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from pedseg.pipeline.backend import Execution, default_threads

logger = logging.getLogger(__name__)

# Compiled models kept in the process, each with the private copy of the network it reads its weights from.
# Between uses each one gives its working memory back (release_memory), so a cached fold holds mainly its weights
# (a full-size fold's checkpoint is about 120 MB, held by the copy; not measured separately).
CACHE_SIZE = 12
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}
_compiled: OrderedDict[tuple, object] = OrderedDict()


def weights_sha256(network: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class OpenVINONetwork(nn.Module):
    """Calls `network` through OpenVINO: same arguments (tensors, or lists of them), float32 CPU tensors out.
    `load_state_dict` loads weights into the wrapped network, as nnU-Net's predictor does for each fold."""

    def __init__(self, network: nn.Module, execution: Execution):
        super().__init__()
        if execution.precision not in _OV_PRECISION:
            raise ValueError(f"OpenVINO runs fp32 or bf16, not {execution.precision}")
        self.network = network.eval()
        self.execution = execution
        self._weights: str | None = None  # SHA-256 of the wrapped network's weights, once computed
        self._current = None  # the compiled model of the last call: its memory is released when another is used

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._weights = None
        return self.network.load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, *args):
        flat = [t for a in args for t in (a if isinstance(a, list | tuple) else [a])]
        compiled = self._compiled_for(args, flat)
        outputs = compiled([np.ascontiguousarray(t.detach().cpu().numpy(), np.float32) for t in flat])
        return torch.from_numpy(outputs[0])

    def release(self) -> None:
        """Gives the last compiled model's working memory back (the model stays cached)."""
        if self._current is not None:
            self._current.release_memory()
            self._current = None

    def _compiled_for(self, args, flat):
        if self._weights is None:
            self._weights = weights_sha256(self.network)
        key = (self._weights, tuple(tuple(t.shape[1:]) for t in flat), self.execution.precision,
               default_threads(self.execution.threads))
        if key not in _compiled:
            # The compiled model keeps reading the exported network's tensors: compiled from the network itself,
            # loading the next fold into it in place would silently turn this fold's cached model into that fold
            # (a later run reusing it got 97.8 % of the labels right). A private copy keeps these weights.
            frozen = copy.deepcopy(self.network)
            _compiled[key] = (_compile(frozen, args, self.execution), frozen)
            while len(_compiled) > CACHE_SIZE:
                _compiled.popitem(last=False)
        _compiled.move_to_end(key)
        compiled = _compiled[key][0]
        if self._current is not None and self._current is not compiled:
            self._current.release_memory()
        self._current = compiled
        return compiled


def _compile(network: nn.Module, args, execution: Execution):
    import openvino as ov

    t0 = time.perf_counter()
    batch = torch.export.Dim("batch")
    with torch.no_grad():  # export traces with fake tensors: only the inputs' shapes matter
        exported = torch.export.export(network, tuple(_example(a) for a in args),
                                       dynamic_shapes=tuple(_batch_dynamic(a, batch) for a in args))
    with warnings.catch_warnings():  # torch's pytree deprecation notice, raised inside OpenVINO's converter
        warnings.simplefilter("ignore", FutureWarning)
        model = ov.convert_model(exported)
    compiled = ov.Core().compile_model(model, "CPU", {
        "INFERENCE_PRECISION_HINT": _OV_PRECISION[execution.precision],  # explicit: AMX CPUs default to bf16
        "INFERENCE_NUM_THREADS": default_threads(execution.threads),
        "PERFORMANCE_HINT": "LATENCY",
        # Pinned threads cannot move off a core another process is using: on a shared 2-core machine a pinned
        # full-size tile took 1.4-1.6x the wall time of an unpinned one for the same CPU time.
        "ENABLE_CPU_PINNING": False,
    })
    logger.debug("OpenVINO compiled %s at %s in %.1f s", type(network).__name__, execution.precision,
                 time.perf_counter() - t0)
    return compiled


@functools.cache
def bf16_convolution_kernel() -> str | None:
    """The kernel OpenVINO's CPU plugin runs a convolution with when asked for bf16 on this CPU (an AMX or
    AVX512-BF16 kernel where bf16 is native; 'jit_avx512_bf16', oneDNN's emulation, on other AVX-512 CPUs), or
    None where it computes such a network in fp32 whatever the hint. Emulated bf16 rounds inputs and weights to
    bf16 and accumulates in fp32 as the native kernels do, only slower: it can test bf16's accuracy, not its
    speed, which is why `auto` still requires native bf16 (pipeline.backend)."""
    compiled = _compile(nn.Conv3d(2, 4, 3).eval(), (torch.zeros(1, 2, 8, 8, 8),), Execution("openvino", "bf16", 1))
    for node in compiled.get_runtime_model().get_ops():
        info = node.get_rt_info()
        if info["layerType"].astype(str) == "Convolution":
            kernel = info["primitiveType"].astype(str)
            return kernel if info["runtimePrecision"].astype(str) == "bf16" else None
    return None


def _example(arg):
    # Batch 2: export specialises a dimension of size 1 to a constant.
    if isinstance(arg, list | tuple):
        return [_example(a) for a in arg]
    return torch.zeros((2, *arg.shape[1:]), dtype=torch.float32)


def _batch_dynamic(arg, batch):
    if isinstance(arg, list | tuple):
        return [_batch_dynamic(a, batch) for a in arg]
    return {0: batch}
