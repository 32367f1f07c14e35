# jobd Makefile.
#
# The lead's targets (run, test, bench) and the freeze targets (venv, build, dist,
# image-test, bench-binary) live in separate blocks below so that branches merge cleanly.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
JOBD_SOURCE ?= jobd.py

# ---------------------------------------------------------------------------
# lead: run / test / bench
# ---------------------------------------------------------------------------
# `make run` serves from source (nothing to install); `make test` sets up .venv
# from the pinned requirements-dev.txt and runs the tests; `make bench` measures.
PY := $(VENV)/bin/python

.PHONY: run test test-deps bench clean

run:
	$(PYTHON) jobd.py $(ARGS)

$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

# The whole suite, against the source and against the frozen dist/jobd. As root, what the
# root-only tests need (Slurm, busybox, debootstrap, build tools) is installed with apt.
test: $(VENV)/.installed test-deps
	@$(MAKE) --no-print-directory dist/jobd || { [ "$$(id -u)" != 0 ] && \
	    echo "make test: no dist/jobd (its build tools are installed as root): its tests skip"; }
	$(PY) -m pytest tests

test-deps:
	@bash ci/test-deps.sh

bench: $(VENV)/.installed dist/jobd   # every measurement runs; fails if a target is missed
	$(PY) tests/bench.py; missed=$$?; $(PY) tests/measure_binary.py dist/jobd && exit $$missed

clean:
	rm -rf $(VENV) build dist .pytest_cache tests/__pycache__ __pycache__


# ---------------------------------------------------------------------------
# freeze: static binary, release tarball, container images (issue 3)
# ---------------------------------------------------------------------------
# make venv          .venv with the pinned build tools (requirements-build.txt) and
#                    staticx built from source with our patch
# make build         dist/jobd: one static executable (PyInstaller + staticx)
# make dist          dist/jobd_<version>_linux_amd64.tar.gz + .sha256 (reproducible)
# make dist-check    the tarball of the build at hand and of one from scratch: same bytes
# make image-test    Dockerfile + examples/Dockerfile.copy-from, offline (buildah/podman, root)
# make bench-binary  size, start-up and idle RSS of dist/jobd (tests/measure_binary.py)
# make rootfs-test   the root-filesystem matrix (tests/test_rootfs.py, root)

# The one source of truth for the version is __version__ in jobd.py.
VERSION = $(shell sed -n 's/^__version__ *= *["'"'"']\([^"'"'"']*\)["'"'"'].*/\1/p' $(JOBD_SOURCE))
ARCH := linux_amd64
RELEASE = jobd_$(VERSION)_$(ARCH)
STATICX_VERSION := 0.14.2
STATICX_SHA256 := bf7d5d35d5777a72b2d4c408eb25f9c61049b28b94a388a012122dba00fffa93
VENV_STAMP := $(VENV)/.freeze-installed
# Reproducible builds: PyInstaller and staticx's scons build depend on hash seeds (set order);
# timestamps come from the commit.
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 315532800)
export SOURCE_DATE_EPOCH
# Libraries staticx stores uncompressed besides the program: bigger file, faster start.
STATICX_STORE ?= libc.so.6
BUILD_ENV := PATH="$(CURDIR)/$(VENV)/bin:$$PATH" PYTHONHASHSEED=0 JOBD_SOURCE="$(abspath $(JOBD_SOURCE))" \
    STATICX_STORE="$(STATICX_STORE)"

.PHONY: venv build dist dist-check image-test bench-binary rootfs-test build-deps clean-build FORCE

venv: $(VENV_STAMP)

build-deps:
	@bash ci/install-build-deps.sh

$(VENV_STAMP): requirements-build.txt packaging/staticx-jobd.patch
	@bash ci/install-build-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-build.txt
	rm -rf .cache/staticx && mkdir -p .cache/staticx
	$(VENV)/bin/pip download -q --disable-pip-version-check --no-deps --no-build-isolation --no-binary :all: \
	    -d .cache/staticx staticx==$(STATICX_VERSION)
	echo "$(STATICX_SHA256)  .cache/staticx/staticx-$(STATICX_VERSION).tar.gz" | sha256sum -c --quiet
	tar -C .cache/staticx -xzf .cache/staticx/staticx-$(STATICX_VERSION).tar.gz
	patch -d .cache/staticx/staticx-$(STATICX_VERSION) -p1 < packaging/staticx-jobd.patch
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" BOOTLOADER_CC=musl-gcc PYTHONHASHSEED=0 \
	    $(VENV)/bin/pip install -q --disable-pip-version-check --no-build-isolation --no-deps \
	    .cache/staticx/staticx-$(STATICX_VERSION)
	$(VENV)/bin/python -c "import staticx, os, sys; d = os.path.join(os.path.dirname(staticx.__file__), 'assets', 'release'); \
	    sys.exit(0 if all(os.path.exists(os.path.join(d, f)) for f in ('bootloader', 'libnssfix.so')) else 'staticx build incomplete (no bootloader or libnssfix.so in ' + d + '): need musl-gcc, gcc, libc6-dev')"
	touch $@

# Rebuild when a setting the binary's bytes depend on changes, not only its files: the
# source named by JOBD_SOURCE, SOURCE_DATE_EPOCH (a new commit, even of docs alone) and
# STATICX_STORE. (dist-check compares the build at hand with one from scratch.)
SOURCE_STAMP := build/.jobd-source
BUILD_SETTINGS = $(abspath $(JOBD_SOURCE)) $(SOURCE_DATE_EPOCH) $(STATICX_STORE)
$(SOURCE_STAMP): FORCE
	@mkdir -p build
	@echo "$(BUILD_SETTINGS)" | cmp -s - $@ || echo "$(BUILD_SETTINGS)" > $@
FORCE:

# PyInstaller one-file build, then staticx bundles the loader, libc, libz, ... into it.
dist/jobd: $(VENV_STAMP) build.spec $(JOBD_SOURCE) $(SOURCE_STAMP)
	@test -n "$(VERSION)" || { echo "no __version__ found in $(JOBD_SOURCE)" >&2; exit 1; }
	$(BUILD_ENV) $(VENV)/bin/pyinstaller --noconfirm --clean --log-level WARN \
	    --distpath build/pyinstaller --workpath build/pyinstaller-work build.spec
	mkdir -p dist
	$(BUILD_ENV) $(VENV)/bin/staticx --strip build/pyinstaller/jobd dist/jobd.tmp
	chmod 755 dist/jobd.tmp   # staticx writes 0700: other users would get exit 126
	mv -f dist/jobd.tmp dist/jobd
	dist/jobd --version

build: dist/jobd

# Same bytes for the same commit: fixed order, owner, mode and mtime in the tar, no name or
# time in the gzip header.
dist: dist/jobd
	@test -f LICENSE || echo "warning: no LICENSE file in the repository; the tarball goes without it" >&2
	rm -rf build/release && mkdir -p build/release
	cp dist/jobd build/release/jobd
	cp README.md build/release/README.md
	if [ -f LICENSE ]; then cp LICENSE build/release/LICENSE; fi
	chmod 755 build/release/jobd && chmod 644 build/release/README.md $(wildcard build/release/LICENSE)
	cd build/release && LC_ALL=C tar --sort=name --format=gnu --owner=0 --group=0 --numeric-owner \
	    --mtime=@$(SOURCE_DATE_EPOCH) -cf - $$(ls) | gzip -9n > $(CURDIR)/dist/$(RELEASE).tar.gz
	cd dist && sha256sum $(RELEASE).tar.gz > $(RELEASE).tar.gz.sha256
	@cat dist/$(RELEASE).tar.gz.sha256

# Two builds of the same commit must give the same tarball: the build at hand (make test's,
# in CI; made now if there is none or it is out of date) and one from scratch.
dist-check:
	$(MAKE) --no-print-directory dist
	cp dist/$(RELEASE).tar.gz build/first.tar.gz
	rm -rf build/pyinstaller build/pyinstaller-work dist/jobd && $(MAKE) --no-print-directory dist
	cmp build/first.tar.gz dist/$(RELEASE).tar.gz && echo "dist is reproducible: $(RELEASE).tar.gz"

image-test: dist   # examples/Dockerfile.tarball installs the release tarball
	bash ci/image-test.sh

bench-binary: dist/jobd
	$(PYTHON) tests/measure_binary.py dist/jobd

rootfs-test: dist/jobd $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q tests/test_rootfs.py

clean-build:
	rm -rf build dist
