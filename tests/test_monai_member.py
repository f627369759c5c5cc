"""MONAI members (pipeline.monai_member): built from constructor arguments, equal to MONAI's own bundle-style
inference on the same network and input, and refused clearly when the declaration and the weights disagree."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_model

from pedseg.pipeline.errors import BundleError
from pedseg.pipeline.monai_member import REQUIRED_NETWORKS, MonaiSpec, load_monai_member, predict

SMALL_ARGS = {
    "SegResNet": {"spatial_dims": 3, "in_channels": 2, "out_channels": 3, "init_filters": 8},
    "SwinUNETR": {"in_channels": 2, "out_channels": 3, "feature_size": 12, "depths": [1, 1, 1, 1],
                  "num_heads": [1, 2, 2, 4]},
    "DynUNet": {"spatial_dims": 3, "in_channels": 2, "out_channels": 3, "kernel_size": [3, 3, 3],
                "strides": [1, 2, 2], "upsample_kernel_size": [2, 2]},
    "UNet": {"spatial_dims": 3, "in_channels": 2, "out_channels": 3, "channels": [8, 16, 32], "strides": [2, 2]},
}


def _entry(name="SegResNet", mirror_axes=(), activation="softmax", **args):
    return {"kind": "monai", "path": "models/m", "weights": "model.safetensors",
            "network": {"name": name, "args": {**SMALL_ARGS[name], **args}},
            "inference": {"roi_size": [32, 32, 32], "overlap": 0.5, "mode": "gaussian", "sw_batch_size": 2,
                          "mirror_axes": list(mirror_axes)},
            "normalisation": "zscore-nonzero", "activation": activation, "outputs": [[0], [1], [2]]}


def _volume(seed=0) -> np.ndarray:
    """Two channels, 40 x 44 x 36 (several overlapping windows), zero outside an off-centre ellipsoid 'head'."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:40, :44, :36]
    head = ((z - 18) / 16) ** 2 + ((y - 24) / 18) ** 2 + ((x - 16) / 14) ** 2 <= 1
    return (rng.normal(300, 60, (2, 40, 44, 36)) * head).astype(np.float32)


def _saved_member(tmp_path, entry) -> tuple[MonaiSpec, torch.nn.Module]:
    torch.manual_seed(0)
    spec = MonaiSpec.from_entry(entry)
    from monai.networks import nets

    network = getattr(nets, spec.network)(**spec.network_args)
    save_model(network, str(tmp_path / "model.safetensors"))
    return spec, load_monai_member(spec, tmp_path / "model.safetensors", "test member")


def _monai_reference(entry, weights) -> tuple:
    """MONAI's own way: a bundle-style config parsed by monai.bundle.ConfigParser (network_def, preprocessing,
    inferer, postprocessing), the weights loaded into its network."""
    from monai.bundle import ConfigParser

    inference = entry["inference"]
    parser = ConfigParser({
        "network_def": {"_target_": entry["network"]["name"], **entry["network"]["args"]},
        "preprocessing": {"_target_": "NormalizeIntensity", "nonzero": True, "channel_wise": True},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": inference["roi_size"],
                    "sw_batch_size": inference["sw_batch_size"], "overlap": inference["overlap"],
                    "mode": inference["mode"]},
        "postprocessing": {"_target_": "Activations", "softmax": entry["activation"] == "softmax",
                           "sigmoid": entry["activation"] == "sigmoid", "dim": 1},
    })
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(weights)
    return network.eval(), parser.get_parsed_content("preprocessing"), parser.get_parsed_content("inferer"), \
        parser.get_parsed_content("postprocessing")


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_equals_monai_bundle_inference(tmp_path, activation):
    entry = _entry(activation=activation)
    spec, network = _saved_member(tmp_path, entry)
    volume = _volume()
    ours = predict(network, volume, spec, torch.device("cpu"))
    ref_net, pre, inferer, post = _monai_reference(entry, network.state_dict())
    with torch.inference_mode():
        theirs = post(inferer(torch.as_tensor(pre(torch.from_numpy(volume)))[None], ref_net))[0].numpy()
    assert ours.shape == (3, 40, 44, 36)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    if activation == "softmax":
        np.testing.assert_allclose(ours.sum(0), 1, atol=1e-5)


def test_mirroring_averages_all_eight_flips(tmp_path):
    entry = _entry(mirror_axes=(0, 1, 2))
    spec, network = _saved_member(tmp_path, entry)
    volume = _volume(1)
    ref_net, pre, inferer, _ = _monai_reference(entry, network.state_dict())
    x = torch.as_tensor(pre(torch.from_numpy(volume)))[None]
    flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    with torch.inference_mode():
        logits = sum(torch.flip(inferer(torch.flip(x, f), ref_net), f) if f else inferer(x, ref_net)
                     for f in flips) / 8
    np.testing.assert_allclose(predict(network, volume, spec, torch.device("cpu")),
                               torch.softmax(logits, 1)[0].numpy(), atol=1e-5)
    # TTA off (--fast) is the plain sliding window.
    plain = predict(network, volume, spec, torch.device("cpu"), tta=False)
    with torch.inference_mode():
        np.testing.assert_allclose(plain, torch.softmax(inferer(x, ref_net), 1)[0].numpy(), atol=1e-5)


@pytest.mark.parametrize("name", REQUIRED_NETWORKS)
def test_every_required_network_builds_and_runs(tmp_path, name):
    edge = 64 if name == "SwinUNETR" else 32  # Swin UNETR halves its input five times
    entry = _entry(name)
    entry["inference"]["roi_size"] = [edge] * 3
    spec, network = _saved_member(tmp_path, entry)
    volume = np.pad(_volume(), ((0, 0), (0, 24), (0, 20), (0, 28)))[:, :edge, :edge, :edge]
    probabilities = predict(network, volume, spec, torch.device("cpu"), tta=False)
    assert probabilities.shape == (3, edge, edge, edge) and np.isfinite(probabilities).all()


def test_refusals_name_the_member_and_the_problem(tmp_path):
    with pytest.raises(BundleError, match="'SegNetX' is not a network in monai.networks.nets"):
        load_monai_member(MonaiSpec.from_entry({**_entry(), "network": {"name": "SegNetX", "args": {}}}),
                          tmp_path / "model.safetensors", "member m")
    spec, _ = _saved_member(tmp_path, _entry())
    wider = MonaiSpec.from_entry(_entry(init_filters=16))
    with pytest.raises(BundleError, match="do not fit SegResNet"):
        load_monai_member(wider, tmp_path / "model.safetensors", "member m")
    four_outputs = MonaiSpec.from_entry({**_entry(), "outputs": [[0], [1], [2], [3]]})
    with pytest.raises(BundleError, match="3 output channels but 'outputs' maps 4"):
        load_monai_member(four_outputs, tmp_path / "model.safetensors", "member m")
    # A pickle that is more than a state dict is never executed.
    torch.save({"state": object()}, tmp_path / "model.pt")
    with pytest.raises(BundleError, match="cannot be read as a state dict"):
        load_monai_member(spec, tmp_path / "model.pt", "member m")


# ------------------------------------------------------------------------------------- OpenVINO backend

OPENVINO_NETWORKS = [pytest.param(name, marks=[] if name == "UNet" else [pytest.mark.slow], id=name)
                     for name in REQUIRED_NETWORKS]  # UNet converts in seconds; SwinUNETR takes about a minute


def _backend_parity(tmp_path, name, execution, mirror_axes=(0,)) -> tuple[float, float]:
    """(argmax agreement, max |Δprobability|) of the member on `execution` against PyTorch fp32, mirroring on."""
    from pedseg.pipeline.backend import TORCH_FP32

    edge = 64 if name == "SwinUNETR" else 32
    entry = _entry(name, mirror_axes=mirror_axes)
    entry["inference"]["roi_size"] = [edge] * 3
    spec, network = _saved_member(tmp_path, entry)
    volume = _volume(2)
    reference = predict(network, volume, spec, torch.device("cpu"), execution=TORCH_FP32)
    ours = predict(network, volume, spec, torch.device("cpu"), execution=execution)
    assert ours.shape == reference.shape and ours.dtype == np.float32
    return float((ours.argmax(0) == reference.argmax(0)).mean()), float(np.abs(ours - reference).max())


@pytest.mark.parametrize("name", OPENVINO_NETWORKS)
def test_openvino_fp32_equals_pytorch_fp32(tmp_path, name):
    """Random weights (near-ties everywhere, the hardest case for argmax), several overlapping windows and a
    mirrored pass. Measured on a 2-core AVX-512 CPU: max |Δprob| 2e-7 (UNet) to 3e-6 (DynUNet), argmax
    agreement 100 % for all four (99.998 % for SegResNet on another volume without mirroring)."""
    from pedseg.pipeline.backend import Execution

    agreement, max_delta = _backend_parity(tmp_path, name, Execution("openvino", "fp32", threads=2))
    assert agreement >= 0.999
    assert max_delta < 1e-4


@pytest.mark.slow
def test_openvino_bf16_agrees_with_pytorch_fp32(tmp_path, openvino_bf16):
    from pedseg.pipeline.backend import Execution

    agreement, max_delta = _backend_parity(tmp_path, "SegResNet", Execution("openvino", "bf16", threads=2))
    assert agreement >= 0.98  # random weights: bf16's 8-bit mantissa flips near-ties
    assert max_delta < 0.1
