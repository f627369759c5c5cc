# Two commands for a fresh machine: `make demo` and `make test` (README). Both install what they need.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: pin torch to the CPU wheel so nnunetv2/deepbet do not pull a multi-GB CUDA build.
CONSTRAINTS ?= constraints-cpu.txt
# orthanc + orthanc-dicomweb: the research PACS the PACS-adapter tests run against (tests/test_pacs_orthanc.py).
APT_PACKAGES := dicom3tools poppler-utils orthanc orthanc-dicomweb

.PHONY: install system-deps demo test test-fast lint bench-preprocess clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[test]"
	touch $@

# dciodvfy (DICOM validator), pdftoppm/pdftotext and Orthanc are used by tests; install them when missing and root.
system-deps:
	@if ! command -v dciodvfy >/dev/null || ! command -v pdftoppm >/dev/null || ! test -x /usr/sbin/Orthanc \
		|| ! test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
		else echo "note: install $(APT_PACKAGES) for the DICOM validation, PDF render and Orthanc tests"; fi; \
	fi

demo: install
	$(VENV)/bin/pedseg demo demo-output

test: install system-deps lint
	$(VENV)/bin/pytest -q

test-fast: install lint
	$(VENV)/bin/pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .

# Our preprocessing against brainles-preprocessing (ANTs) on a synthetic session, in one run (bench/RESULTS.md).
# brainles pins older rich/click/scipy than ours, so it gets its own venv layered over ours through a .pth file
# that adds our site-packages as a site directory (so its own .pth files, pedseg's editable finder, work there too).
BRAINLES_VENV ?= scratch/bench/brainles-venv
bench-preprocess: install $(BRAINLES_VENV)/.installed
	$(PY) bench/preprocess.py --n4

$(BRAINLES_VENV)/.installed: $(CONSTRAINTS)
	$(PYTHON) -m venv $(BRAINLES_VENV)
	$(PY) -c "import sysconfig; print('import site; site.addsitedir(%r)' % sysconfig.get_paths()['purelib'])" > \
		"$$($(BRAINLES_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz_project.pth"
	$(BRAINLES_VENV)/bin/pip install --quiet -c $(CONSTRAINTS) brainles-preprocessing
	touch $@

clean:
	rm -rf demo-output .pytest_cache
