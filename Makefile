# sfmpi: `make demo` and `make test` work on a fresh Debian 12 machine as root.
# Every step is idempotent and quick the second time.

PYTHON ?= python3
DEBS := qemu-system-x86 qemu-utils debootstrap nftables iproute2 e2fsprogs util-linux fuse3 libfuse3-dev pkg-config \
        libjson-c-dev gcc g++ make dnsmasq-base busybox iputils-ping libssl-dev \
        slurm-wlm munge gridengine-master gridengine-exec gridengine-client \
        haproxy libjs-chart.js chromium chromium-driver \
        libvirt-daemon-system-sysv libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
STAMP := .make

.PHONY: deps image native test unit integration demo bench clean

$(STAMP):
	mkdir -p $(STAMP)

# Debian packages: only call apt when one is missing.
$(STAMP)/debs: Makefile | $(STAMP)
	@missing=$$(for p in $(DEBS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@# libvirtd will not start without the QEMU user it was built with (docs/platform.md, libvirt 9.0);
	@# libvirt-daemon-system would make it, but brings a NAT network along.
	@getent passwd libvirt-qemu >/dev/null || useradd --system --user-group --no-create-home \
	  --home-dir /var/lib/libvirt --shell /usr/sbin/nologin libvirt-qemu
	touch $@

$(STAMP)/python: setup.py | $(STAMP)
	$(PYTHON) -m pip install -q -e '.[test]'
	touch $@

# The editable install must point at this checkout (another clone may have made the stamp's install).
deps: $(STAMP)/debs $(STAMP)/python
	@(cd / && $(PYTHON) -c 'import sfmpi, sys; sys.exit(not sfmpi.__file__.startswith("$(CURDIR)/"))') 2>/dev/null || \
	  { echo "installing sfmpi from $(CURDIR)"; $(PYTHON) -m pip install -q -e '.[test]'; }

# Cached by a hash of its recipe: a second build returns at once.
image: deps
	sfmpi image build

# libsfclone, the C client of the guest clone API: native/build/; the extension
# sfmpi._native (the memory server and memtap, native/memory/) next to the package.
native: deps
	$(MAKE) -C native
	$(PYTHON) setup.py -q build_ext --inplace

unit: deps native
	$(PYTHON) -m pytest tests/unit -q

integration: deps image native
	$(PYTHON) -m pytest tests/integration -q

test: deps image native
	$(PYTHON) -m pytest tests -q

demo: deps image native
	$(PYTHON) examples/demo.py

bench: deps image native
	$(PYTHON) bench/fork.py

clean:
	rm -rf $(STAMP)
