"""Measurement store: each run's time point is recorded under a subject key and read back as the subject's history.

One interface (`tracking.store.MeasurementStore`), two back ends: `tracking.sqlite` (one file, for the CLI and
the PACS listener) and `tracking.flywheel` (session `info` plus earlier analyses' measurement files, through the
SDK). The change computation itself is pure and lives in `pipeline.longitudinal`.
"""
