"""Convert a trained DeepMedic model (TensorFlow checkpoint, DeepMedic 0.8.x) into a pedseg "deepmedic" member.

    python scripts/convert_deepmedic.py ../shared/models/captk-deepmedic-brats \
        bundles/captk-deepmedic-brats/models/deepmedic

Reads the model's modelConfig.txt (a Python file of assignments, as DeepMedic itself reads it) and its tensors:
from the checkpoint with TensorFlow when TensorFlow is installed, otherwise from `weights_by_name.npz` beside it
(the same tensors by name, readable with numpy). Writes `architecture.json` and `model.safetensors`, whose
metadata records the SHA-256 of the source checkpoint files and marks the weights as a modified (converted) form.
The conversion renames tensors and averages DeepMedic's 60 rolling batch-norm statistics into one mean and one
variance, as DeepMedic does at inference; no value is otherwise changed.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from pedseg.pipeline.deepmedic import DeepMedic, DeepMedicArchitecture

CHECKPOINT_FILES = ("model.ckpt.index", "model.ckpt.data-00000-of-00001")
MODIFIED_NOTICE = ("Modified form of the CaPTk/DeepMedic TensorFlow checkpoint: tensors renamed and converted to "
                   "safetensors, batch-norm rolling statistics averaged; converted by pedseg "
                   "scripts/convert_deepmedic.py")


def read_model_config(path: Path) -> dict:
    """DeepMedic's modelConfig: `name = literal` assignments in Python syntax."""
    tree = ast.parse(path.read_text())
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}


def architecture(config: dict) -> DeepMedicArchitecture:
    for key in ("kernelDimPerLayerNormal", "kernelDimPerLayerSubsampled"):
        if any(list(k) != [3, 3, 3] for k in config.get(key, [])):
            raise SystemExit(f"{key}: only 3x3x3 kernels are supported")
    if config.get("lowerRankLayersNormal") or config.get("activationFunction", "prelu") != "prelu":
        raise SystemExit("only full-rank layers with PReLU are supported")
    factors = [f[0] for f in config.get("subsampleFactor", [[3, 3, 3]])]
    fc = config.get("numberFMsPerLayerFC", [])
    normal = tuple(config["numberFMsPerLayerNormal"])
    return DeepMedicArchitecture(
        input_channels=config["numberOfInputChannels"], classes=config["numberOfOutputClasses"],
        feature_maps=normal, subsampled_feature_maps=tuple(config.get("numberFMsPerLayerSubsampled", normal)),
        subsample_factors=tuple(factors),
        residual_layers=tuple(config.get("layersWithResidualConnNormal", [])),
        fc_feature_maps=tuple(fc), fc_first_kernel=config.get("kernelDimFor1stFcLayer", [1, 1, 1])[0],
        fc_residual_layers=tuple(config.get("layersWithResidualConnFC", [])),
        fc_dropout=tuple(config.get("dropoutRatesFc", [0.0] + [0.5] * len(fc))),
        segment=config.get("segmentsDimInference", config["segmentsDimTrain"])[0])


def read_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    try:
        import tensorflow as tf
    except ImportError:
        with np.load(model_dir / "weights_by_name.npz") as npz:
            return {name: npz[name] for name in npz.files}
    reader = tf.train.load_checkpoint(str(model_dir / "model.ckpt"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map() if name.startswith("net/")}


class _CheckpointNames:
    """TensorFlow names variables in creation order: the first `net/W`, then `net/W_1`, `net/W_2`, ..."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors = tensors
        self.seen: Counter[str] = Counter()

    def take(self, base: str) -> torch.Tensor:
        count = self.seen[base]
        self.seen[base] += 1
        return torch.from_numpy(np.ascontiguousarray(self.tensors[f"net/{base}" + (f"_{count}" if count else "")]))


def state_dict(model: DeepMedic, tensors: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the module's names, walked in DeepMedic's creation order: each pathway's
    input bias and first convolution, then per block BN (gamma, beta, rolling mu and var, two training buffers),
    PReLU and convolution; the FC blocks; the softmax bias."""
    names = _CheckpointNames(tensors)
    out: dict[str, torch.Tensor] = {}

    def block(prefix: str) -> None:
        out[f"{prefix}.norm.weight"] = names.take("gBn")
        out[f"{prefix}.norm.bias"] = names.take("bBn")
        out[f"{prefix}.norm.running_mean"] = names.take("muBnsForRollingAverage").mean(0)
        out[f"{prefix}.norm.running_var"] = names.take("varBnsForRollingAverage").mean(0)
        names.take("sharedNewMu_B"), names.take("sharedNewVar_B")  # training buffers
        out[f"{prefix}.norm.num_batches_tracked"] = torch.tensor(0)
        out[f"{prefix}.act.weight"] = names.take("aPrelu")
        out[f"{prefix}.conv.weight"] = names.take("W")

    pathways = [("normal", model.normal)] + [(f"subsampled.{i}", p) for i, p in enumerate(model.subsampled)]
    for prefix, pathway in pathways:
        out[f"{prefix}.input_bias"] = names.take("b")
        out[f"{prefix}.first.weight"] = names.take("W")
        for index in range(len(pathway.blocks)):
            block(f"{prefix}.blocks.{index}")
    for index in range(len(model.fc)):
        block(f"fc.{index}")
    out["output_bias"] = names.take("b")
    unused = sorted(set(tensors) - {f"net/{b}" + (f"_{i}" if i else "") for b, n in names.seen.items()
                                    for i in range(n)})
    if unused:
        raise SystemExit(f"checkpoint tensors not used by the architecture: {unused[:5]}")
    return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="folder with modelConfig.txt and model.ckpt.* "
                                                     "(or weights_by_name.npz)")
    parser.add_argument("out", type=Path, help="member folder to write (architecture.json, model.safetensors)")
    args = parser.parse_args()
    config = read_model_config(args.model_dir / "modelConfig.txt")
    arch = architecture(config)
    model = DeepMedic(arch)
    weights = state_dict(model, read_tensors(args.model_dir))
    model.load_state_dict(weights, strict=True)  # every shape checked against the architecture
    sources = {name: sha256(args.model_dir / name) for name in (*CHECKPOINT_FILES, "modelConfig.txt")
               if (args.model_dir / name).is_file()}
    metadata = {"format": "pt", "model_name": str(config.get("modelName", "")), "modified": MODIFIED_NOTICE,
                "source_sha256": json.dumps(sources, sort_keys=True)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "architecture.json").write_text(arch.to_json())
    save_file(weights, str(args.out / "model.safetensors"), metadata=metadata)
    print(f"wrote {args.out}: {sum(v.numel() for v in weights.values())} values; sources {sources}")


if __name__ == "__main__":
    main()
