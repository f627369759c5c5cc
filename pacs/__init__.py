"""PACS companion: receive a study by DICOM C-STORE, run one pipeline call on it, send SEG, SR and PDF back.

Nothing here knows how the pipeline works: the listener translates "a study arrived" into one
`run_pipeline(study_folder, output_folder, config)` call and the output files into C-STORE or STOW-RS requests.
"""
