"""Test data built by hand, in one place: DICOM datasets, model bundles that load without real weights, and a
fake Flywheel SDK that behaves as the parts of flywheel-sdk the gear and the Flywheel store use."""
from __future__ import annotations

import copy
import gzip
import io
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
                weights: bytes = b"not a checkpoint", model_required: tuple[str, ...] | None = None) -> Path:
    """A bundle of one model, folds 0 and 1, that passes load_bundle (files present, mappings consistent) but
    holds no real weights: enough for every run that stops before inference, and for the bundle hash (which
    covers `weights`). `channels`: what the model's dataset.json declares; `missing_fold`: listed, not on disk;
    `required`: the bundle's required inputs; `model_required`: the model's (default: every input)."""
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
            "models": [{"path": str(folder.relative_to(root)), "folds": [0, 1],
                        **({"required_inputs": list(model_required)} if model_required else {})}]}
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

    def preprocess(session, identification, workdir, config, *, patient_age_years=None, preparations=()):
        return Preprocessed(images=images, brain_mask=next(iter(images.values())), native=images,
                            atlas_to_native=dict.fromkeys(images, Path("identity.tfm")), qc=passing_qc())

    def infer(pre, bundle, workdir, config):
        return Prediction(labels=labels, probabilities={}, uncertainty=None, models_used=["fake"],
                          folds_used=["fake/fold_0"], tta=False, device="cpu")

    monkeypatch.setattr(runner, "preprocess", preprocess)
    monkeypatch.setattr(runner, "infer", infer)
    monkeypatch.setattr(runner, "labels_to_native", lambda atlas_labels, transform, native: atlas_labels)


def tiny_tumour_labels(path: Path) -> Path:
    """Labels for `tiny_atlas_case`'s grid (z, y, x on a 1 mm grid from (-12, -2, -16) LPS): oedema around a
    non-enhancing core around an enhancing centre, reaching through the sagittal T1c and the axial FLAIR."""
    arr = np.zeros((75, 20, 30), np.uint8)
    arr[2:56, 2:18, 2:22] = 4  # ED
    arr[8:26, 5:14, 6:16] = 2  # NET
    arr[11:21, 7:12, 8:14] = 1  # ET
    labels = sitk.GetImageFromArray(arr)
    labels.SetOrigin((-12.0, -2.0, -16.0))
    sitk.WriteImage(labels, str(path))
    return path


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


def fake_pipeline_run(tmp: Path, store=None, **config_changes):
    """One run through the real runner and every writer, preprocessing and inference replaced
    (`fake_model_stages` with `tiny_atlas_case` images and `tiny_tumour_labels`), on hostile_support's DICOM
    session: (RunResult, the DICOM session folder). The labels are at tmp/labels.nii.gz."""
    from pedseg.pipeline.config import PipelineConfig
    from pedseg.runner import run_pipeline

    from hostile_support import write_session

    images, _ = tiny_atlas_case(tmp / "atlas")
    tiny_tumour_labels(tmp / "labels.nii.gz")
    with pytest.MonkeyPatch.context() as patch:
        fake_model_stages(patch, images, tmp / "labels.nii.gz")
        session = write_session(tmp / "dicom")
        config = PipelineConfig(bundle=fake_bundle(tmp / "bundle"), **config_changes)
        return run_pipeline(session, tmp / "out", config, store), session


def write_training_case(seed: int, folder: Path) -> tuple[dict[str, Path], sitk.Image]:
    """A synthetic training case (pedseg.synth.session) written as one NIfTI per role: (role -> path, labels)."""
    from pedseg.synth.session import generate_training_case

    images, truth = generate_training_case(seed)
    paths = {}
    for role, image in images.items():
        paths[role] = folder / f"{role}.nii.gz"
        sitk.WriteImage(image, str(paths[role]))
    return paths, truth


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


# ------------------------------------------------------------------------------------- de-identification

# What the DICOM Basic Application Level Confidentiality Profile removes unless "Retain Descriptors" is kept, and
# the vendor's sequence name that de-identification tools often blank with them.
NAME_ATTRIBUTES = ("SeriesDescription", "ProtocolName", "SequenceName", "PulseSequenceName")


# What says a series is post-contrast in its header, for sessions whose contrast only the images can tell.
CONTRAST_ATTRIBUTES = ("ContrastBolusAgent", "ContrastBolusIngredient", "ContrastBolusAgentSequence",
                       "ContrastBolusUsageSequence")


def blank_names(src: Path, dst: Path, *, remove: tuple[str, ...] = ()) -> Path:
    """A copy of the DICOM files under `src` (a file or a folder) in `dst`, with every NAME_ATTRIBUTES value blanked
    wherever it occurs (top level, functional groups) and the `remove` attributes (e.g. CONTRAST_ATTRIBUTES)
    deleted; everything else as the scanner wrote it."""
    def blank(ds, elem):
        if elem.keyword in NAME_ATTRIBUTES:
            elem.value = ""
        elif elem.keyword in remove:
            del ds[elem.tag]

    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    for path in files:
        target = dst / (path.name if src.is_file() else path.relative_to(src))
        target.parent.mkdir(parents=True, exist_ok=True)
        zipped = path.suffix == ".gz"  # the shared data keeps some objects gzipped, as ingest accepts them
        try:
            with (gzip.open(path) if zipped else open(path, "rb")) as fh:
                ds = pydicom.dcmread(fh, force=True)
            if "SOPClassUID" not in ds:
                raise ValueError("not DICOM")
            ds.walk(blank)
            out = io.BytesIO()
            ds.save_as(out)
        except Exception:  # noqa: BLE001 - not DICOM (a README, a licence): copied as it is
            target.write_bytes(path.read_bytes())
            continue
        target.write_bytes(gzip.compress(out.getvalue()) if zipped else out.getvalue())
    return dst


# ---------------------------------------------------------------------------------------- T1 head phantom


def t1_head(grid: sitk.Image, *, post: bool, seed: int = 0) -> sitk.Image:
    """A T1-weighted head on `grid` (any spacing, orientation, origin: the anatomy is defined in LPS millimetres, so
    two grids image one head): scalp fat, grey and white matter, asymmetric ventricles (the left one larger), and
    the structures gadolinium brightens: the superior sagittal sinus, the choroid plexus of the left ventricle, the
    pituitary and an enhancing tumour rim in the right hemisphere. `post`: after contrast. White matter is 1000."""
    size, spacing = np.array(grid.GetSize()), np.array(grid.GetSpacing())
    direction, origin = np.array(grid.GetDirection()).reshape(3, 3), np.array(grid.GetOrigin())
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    index = np.stack([i, j, k], axis=-1) * spacing
    x, y, z = np.moveaxis(origin + index @ direction.T, -1, 0)

    def ellipsoid(cx, cy, cz, ax, ay, az):
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1

    head, brain = ellipsoid(0, 0, 0, 75, 95, 80), ellipsoid(0, 0, 0, 65, 85, 70)
    t1 = np.where(head, 1400.0, 0.0)  # scalp fat
    t1[ellipsoid(0, 0, 0, 70, 90, 75) & ~brain] = 150.0  # skull and CSF
    t1[brain] = 750.0  # grey matter
    t1[ellipsoid(0, 0, 5, 55, 75, 55)] = 1000.0  # white matter
    ventricles = ellipsoid(12, 5, 10, 7, 25, 12) | ellipsoid(-10, 5, 10, 5, 22, 10)
    t1[ventricles] = 300.0
    sinus = (np.hypot(x, z - 68) <= 4) & (np.abs(y) <= 70)  # along the top of the falx, posterior to anterior
    choroid = ellipsoid(12, 15, 8, 3, 6, 3)
    pituitary = ellipsoid(0, -20, -35, 5, 4, 4)
    rim = ellipsoid(-35, -20, 20, 14, 14, 14) & ~ellipsoid(-35, -20, 20, 10, 10, 10)
    for structure, pre, gad in ((sinus, 600.0, 1900.0), (choroid, 650.0, 1700.0), (pituitary, 800.0, 1600.0),
                                (rim, 700.0, 1500.0)):
        t1[structure] = gad if post else pre
    t1[ellipsoid(-35, -20, 20, 10, 10, 10)] = 350.0  # necrotic core
    noisy = t1 + np.random.default_rng(seed).normal(0.0, 20.0, t1.shape) * head
    image = sitk.GetImageFromArray(np.clip(noisy, 0, None).astype(np.float32))
    image.CopyInformation(grid)
    return image


def grid(size: tuple[int, int, int], spacing: tuple[float, float, float], axes=((1, 0, 0), (0, 1, 0), (0, 0, 1)),
         rotate_deg: float = 0.0) -> sitk.Image:
    """An empty image of `size` voxels centred on the origin, its axes (row, column, slice normal in LPS) turned
    by `rotate_deg` about the left-right axis (a head pose)."""
    turn = np.deg2rad(rotate_deg)
    tilt = np.array([[1, 0, 0], [0, np.cos(turn), -np.sin(turn)], [0, np.sin(turn), np.cos(turn)]])
    direction = tilt @ np.array(axes, float).T
    image = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetDirection(tuple(direction.flatten()))
    centre = direction @ ((np.array(size) - 1) * np.array(spacing) / 2)
    image.SetOrigin(tuple(-centre))
    return image
