"""pedseg: pediatric brain tumour segmentation from a DICOM MRI session (research use only).

The package root holds the orchestration above the stages: `pedseg.runner` (stages then writers),
`pedseg.workspace` (the output folder's lifecycle) and `pedseg.logs` (logging set-up). Its subpackages are
the repository's folders (docs/architecture.md): `pipeline` (the stages), `reporting` (the writers), the
adapters `cli`, `gear` and `pacs`, `tracking` (measurement stores) and `synth` (synthetic sessions).
"""
from importlib import metadata

__version__ = metadata.version("pedseg")
