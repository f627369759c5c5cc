"""Test data built by hand, in one place: DICOM datasets, model bundles that load without real weights, and a
fake Flywheel SDK that behaves as the parts of flywheel-sdk the gear and the Flywheel store use."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from pedseg.pipeline.labels import LABEL_VALUES
from pedseg.pipeline.types import QC, ROLES, Prediction, Preprocessed

# The shared test data beside the checkout (../shared/data/README.md says what each case is good for).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def needs_shared_data(test):
    """Marks a test that reads the shared data (marker shared_data) and skips it where the folder is absent."""
    return pytest.mark.shared_data(pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not "
                                                      "beside the checkout")(test))


# ------------------------------------------------------------------------------------------------- DICOM


def dicom_dataset(sop_class: str = MRImageStorage, *, pixels: np.ndarray | None = None, **attributes) -> Dataset:
    """A DICOM object with its file meta and SOP UIDs; every keyword argument is an attribute. With `pixels`
    (rows x columns, unsigned 16 bit) it is a MONOCHROME2 image."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.asarray(pixels, np.uint16).tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def write_dicom(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


# ------------------------------------------------------------------------------------------------ bundles


def fake_bundle(root: Path, *, channels: int = 4, missing_fold: int | None = None, required: tuple[str, ...] = ROLES,
                weights: bytes = b"not a checkpoint") -> Path:
    """A bundle of one model, folds 0 and 1, that passes load_bundle (files present, mappings consistent) but
    holds no real weights: enough for every run that stops before inference, and for the bundle hash (which
    covers `weights`). `channels`: what the model's dataset.json declares; `missing_fold`: listed, not on disk;
    `required`: the bundle's required inputs."""
    folder = root / "models" / "Dataset999_Test__nnUNetPlans__3d_fullres"
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {str(i): f"c{i}" for i in range(channels)}}))
    (folder / "plans.json").write_text("{}")
    for fold in (0, 1):
        if fold != missing_fold:
            (folder / f"fold_{fold}").mkdir()
            (folder / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(weights)
    spec = {"name": "fake-bundle", "version": "0", "inputs": {role: channel for channel, role in enumerate(ROLES)},
            "required_inputs": list(required), "label_convention": "2024",
            "labels": {str(v): region for region, v in LABEL_VALUES["2024"].items()},
            "models": [{"path": str(folder.relative_to(root)), "folds": [0, 1]}]}
    (root / "bundle.json").write_text(json.dumps(spec))
    return root


def passing_qc(**changes) -> QC:
    """Preprocessing QC of an unremarkable run (no flags), with any field changed."""
    values = dict(registration={}, flags=(), step_seconds={}, brain_extraction="deepbet", similarity_in_brain={},
                  brain_inside_atlas_brain=0.9, brain_volume_ml=1200.0, mask_fraction_of_head=0.55)
    return QC(**{**values, **changes})


def fake_model_stages(monkeypatch, images: dict[str, Path], labels: Path) -> None:
    """Preprocessing and inference (minutes on real images) replaced by the given atlas-space images (role ->
    NIfTI) and label map (internal convention); the runner's other stages and every writer run for real."""
    from pedseg import runner

    def preprocess(session, identification, workdir, config, *, patient_age_years=None):
        return Preprocessed(images=images, brain_mask=next(iter(images.values())), native=images,
                            atlas_to_native=dict.fromkeys(images, Path("identity.tfm")), qc=passing_qc())

    def infer(pre, bundle, workdir, config):
        return Prediction(labels=labels, probabilities={}, uncertainty=None, models_used=["fake"],
                          folds_used=["fake/fold_0"], tta=False, device="cpu")

    monkeypatch.setattr(runner, "preprocess", preprocess)
    monkeypatch.setattr(runner, "infer", infer)
    monkeypatch.setattr(runner, "labels_to_native", lambda atlas_labels, transform, native: atlas_labels)


def tiny_atlas_case(folder: Path, labels: np.ndarray | None = None, roles=ROLES) -> tuple[dict[str, Path], Path]:
    """Small images of every role and a label map on one 2 mm grid (all background unless `labels` is given):
    what `fake_model_stages` hands the runner."""
    labels = np.zeros((16, 20, 24), np.uint8) if labels is None else labels
    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for role in roles:
        image = sitk.GetImageFromArray((100 + 50 * (labels > 0)).astype(np.float32))
        image.SetSpacing((2.0, 2.0, 2.0))
        images[role] = folder / f"{role}.nii.gz"
        sitk.WriteImage(image, str(images[role]))
    label_image = sitk.GetImageFromArray(labels.astype(np.uint8))
    label_image.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(label_image, str(folder / "labels.nii.gz"))
    return images, folder / "labels.nii.gz"


# ------------------------------------------------------------------------------------------ Flywheel SDK


class FakeFile:
    def __init__(self, name: str, kind: str = "file", info: dict | None = None):
        self.name, self.type, self.info = name, kind, dict(info or {})


class _Downloads:
    """Files held by a container: name -> (Flywheel file type, bytes, info)."""

    def __init__(self, files: dict[str, tuple[str, bytes, dict]], downloads: list[str] | None = None):
        self._data = {name: data for name, (_, data, _) in files.items()}
        self.files = [FakeFile(name, kind, info) for name, (kind, _, info) in files.items()]
        self.downloads = downloads if downloads is not None else []

    def reload(self):
        return self

    def download_file(self, name: str, dest: str) -> None:
        self.downloads.append(name)
        Path(dest).write_bytes(self._data[name])


class FakeAcquisition(_Downloads):
    pass


class FakeAnalysis(_Downloads):
    def __init__(self, analysis_id: str, gear_name: str = "pedseg-brain-tumor", info: dict | None = None, *,
                 parent: tuple[str, str] = ("session", "session-0"), files: dict[str, bytes] | None = None):
        super().__init__({name: ("source code", data, {}) for name, data in (files or {}).items()})
        self.id, self.info = analysis_id, dict(info or {})
        self.gear_info = SimpleNamespace(name=gear_name)
        self.parent = SimpleNamespace(type=parent[0], id=parent[1])


class FakeSession:
    def __init__(self, session_id: str, subject: str | None, acquisitions=(), *, info: dict | None = None,
                 tags: list[str] | None = None, analyses=()):
        self.id, self._acquisitions = session_id, list(acquisitions)
        self.info, self.tags, self.analyses = dict(info or {}), list(tags or []), list(analyses)
        self.parents = SimpleNamespace(group="group", project="65f0c0ffee0000000000abcd", subject=subject)
        self.info_updates = 0

    def acquisitions(self):
        return self._acquisitions

    def reload(self):
        return self

    def update_info(self, update: dict) -> None:
        """Flywheel's set_session_info: each given top-level key is set (as JSON), every other key stays."""
        self.info_updates += 1
        self.info.update(copy.deepcopy(json.loads(json.dumps(update))))

    def replace_info(self, info: dict) -> None:
        raise AssertionError("replace_info would drop every other gear's session info")

    def add_tag(self, tag: str) -> None:
        assert tag not in self.tags, "Flywheel refuses a tag the container already has"
        self.tags.append(tag)


class FakeClient:
    """The sessions it knows (the analysed one and the subject's others) and the analyses reachable by id."""

    def __init__(self, sessions, analyses=()):
        self.sessions = {s.id: s for s in sessions}
        self.analyses = {a.id: a for a in analyses}
        self.api_keys: list[str] = []

    def get_session(self, session_id):
        return self.sessions[session_id]

    def get_analysis(self, analysis_id):
        return self.analyses[analysis_id]

    def get_subject(self, subject_id):
        members = [s for s in self.sessions.values() if s.parents.subject == subject_id]
        return SimpleNamespace(id=subject_id, sessions=lambda: members)
