# Everything a fresh machine needs: `make test` and `make demo` create the virtualenv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SOURCES := pyproject.toml setup.py ringreader/ringreader.c ringreader/ringreader.h ringreader/_build.py \
	$(wildcard migrated/pagehash/*.[ch]) migrated/pagehash/_build.py \
	$(wildcard migrated/kvm/ioctlbatch/*.[ch]) migrated/kvm/ioctlbatch/_build.py \
	$(wildcard migrated/guests/x86_64/*.[chS] migrated/guests/x86_64/*.ld) \
	$(wildcard migrated/guests/aarch64/*.[chS] migrated/guests/aarch64/*.ld) migrated/guests/build.py

.PHONY: venv build test typecheck lint format demo caps bench faults soak clean system-packages fuzz FORCE

venv: $(VENV)/.installed

# The Debian packages of .ci/system-packages (the one list, shared with .ci/run).
system-packages:
	@bash .ci/install-system-packages

# What the package build compiles with: a cross compiler that appears later (or a new gcc)
# changes this file, and the virtualenv is rebuilt, so the arm64 guest image gets built then.
$(VENV)/.toolchain: system-packages FORCE
	@mkdir -p $(VENV)
	@fp="$$(for t in gcc objcopy aarch64-linux-gnu-gcc aarch64-linux-gnu-objcopy; do \
	  command -v $$t >/dev/null && echo "$$t $$($$t --version | head -1)" || echo "$$t absent"; done)"; \
	if [ "$$fp" != "$$(cat $@ 2>/dev/null)" ]; then echo "$$fp" > $@; fi

$(VENV)/.installed: $(SOURCES) $(VENV)/.toolchain
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel cffi
	$(PY) -m pip install -q -e '.[test,fuzz]'
	$(PY) -c "import ringreader, migrated.guests.workload"
	touch $@

build: venv

# pytest's exit 5 means no test ran: a failure here.
test: venv
	$(PY) -m pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$status

typecheck: venv
	$(PY) -m mypy migrated transport ringreader

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .

demo: venv
	$(PY) -m migrated.demo

caps: venv
	$(VENV)/bin/migratectl caps

bench: venv
	$(PY) bench/harvest.py

# Every fuzz/fuzz_*.py is a libFuzzer script (atheris): each runs to FUZZ_RUNS inputs; crashing
# inputs land in fuzz/crashes/. FUZZ_ARGS adds libFuzzer flags (-jobs=N, -max_len=N, corpus dirs).
FUZZ_RUNS ?= 1000000
FUZZ_ARGS ?=
fuzz: venv
	mkdir -p fuzz/crashes
	@for harness in fuzz/fuzz_*.py; do \
		echo "== $$harness: $(FUZZ_RUNS) inputs"; \
		$(PY) $$harness -runs=$(FUZZ_RUNS) -print_final_stats=1 -artifact_prefix=fuzz/crashes/ $(FUZZ_ARGS) \
			|| exit 1; \
	done

# The fault matrix (issue 11): every fault kind at every migration phase between two daemons in
# their own network namespaces (root: ip netns, tc, tmpfs mounts); JSON in bench/out/faults.json.
# FAULTS_ARGS e.g. "--seed 7 --faults 20".
FAULTS_ARGS ?=
faults: venv
	$(PY) bench/faults.py $(FAULTS_ARGS)

# 100 ping-pong migrations with fds, threads and RSS sampled, then 4 VMs at once both ways;
# bench/out/soak.json and bench/out/soak.svg.
SOAK_ARGS ?=
soak: venv
	$(PY) bench/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info ringreader/*.so migrated/pagehash/*.so migrated/kvm/ioctlbatch/*.so migrated/guests/*.bin

# The arm64 lane (.ci/arm64/lane): tests marked arm64, on a real arm64 KVM inside an emulated
# arm64 machine; fetches and caches what it needs under ~/.cache/migrated/arm64. pytest's exit
# code is the lane's. ARM64_PYTEST_ARGS replaces "tests/arm64 -q" (-m arm64 is always given first).
ARM64_PYTEST_ARGS ?=
.PHONY: test-arm64
test-arm64:
	bash .ci/arm64/lane $(ARM64_PYTEST_ARGS)

# The systemd lane (.ci/systemd/lane): the daemon under a real systemd (PID 1 of a Debian 12
# container booted with systemd-nspawn), the unit as shipped, two instances, a live migration
# between them. Caches under ~/.cache/migrated/systemd. SYSTEMD_PYTEST_ARGS replaces "-q".
SYSTEMD_PYTEST_ARGS ?=
.PHONY: test-systemd
test-systemd: venv
	bash .ci/systemd/lane $(SYSTEMD_PYTEST_ARGS)
