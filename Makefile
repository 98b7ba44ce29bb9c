# swtpm-keeper: build, install, test.
#   make                      build the release binary (cargo)
#   make install              install (as root); DESTDIR, PREFIX, ... below;
#                             starts the capture timer where systemd runs
#   make uninstall            remove what install put in place; the store stays
#   make test                 the unprivileged tests (cargo test; any user)
#   make lint                 cargo fmt --check and cargo clippy -D warnings
#   make check                every test, hermetic and against a real libvirtd
#                             (as root on Debian 12; installs what it needs)
#   make mutants              mutation testing of the core (cargo-mutants; hours)
# Packagers: `make && make install DESTDIR=$pkgdir PREFIX=/usr` (see
# docs/packaging.md). With DESTDIR set, install never touches the running
# system (no daemon reload).

PREFIX        ?= /usr
SBINDIR       ?= $(PREFIX)/sbin
LIBEXECDIR    ?= $(PREFIX)/libexec
MANDIR        ?= $(PREFIX)/share/man
# docs/monitoring.md, docs/backup.md, and examples/ (the Prometheus alert
# rules, the virtnbdbackup script).
DOCDIR        ?= $(PREFIX)/share/doc/swtpm-keeper
SYSCONFDIR    ?= /etc
# systemd's system unit directory (the capture timer).
UNITDIR       ?= $(PREFIX)/lib/systemd/system
LOCALSTATEDIR ?= /var
# The hook's file name in qemu.d/ (libvirt runs them in strcmp order).
HOOKNAME      ?= swtpm-keeper
CARGO         ?= cargo
CARGOFLAGS    ?= --locked
CARGO_TARGET_DIR ?= target
export CARGO_TARGET_DIR
VERSION       := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)

BIN      = $(CARGO_TARGET_DIR)/release/swtpm-keeper
PKGLIBEXEC = $(LIBEXECDIR)/swtpm-keeper
HOOKDIR  = $(SYSCONFDIR)/libvirt/hooks/qemu.d
MAINHOOK = $(SYSCONFDIR)/libvirt/hooks/qemu
CONFDIR  = $(SYSCONFDIR)/swtpm-keeper
STOREDIR = $(LOCALSTATEDIR)/lib/swtpm-keeper

.PHONY: all build install uninstall test lint check clean deb distro-deb rpm dist mutants

all: build

build:
	$(CARGO) build --release $(CARGOFLAGS)

# Rebuilt whenever a source changes, so `make install` never installs a
# stale binary.
$(BIN): Cargo.toml Cargo.lock $(shell find src -name '*.rs')
	$(CARGO) build --release $(CARGOFLAGS)

install: $(BIN)
	install -D -m 0755 $(BIN) $(DESTDIR)$(PKGLIBEXEC)/swtpm-keeper
	install -d -m 0755 $(DESTDIR)$(SBINDIR) $(DESTDIR)$(HOOKDIR) $(DESTDIR)$(CONFDIR)
	ln -sfnr $(DESTDIR)$(PKGLIBEXEC)/swtpm-keeper $(DESTDIR)$(SBINDIR)/swtpm-keeper
	ln -sfn $(PKGLIBEXEC)/swtpm-keeper $(DESTDIR)$(HOOKDIR)/$(HOOKNAME)
	# An operator's configuration is never overwritten.
	[ -e $(DESTDIR)$(CONFDIR)/swtpm-keeper.conf ] || \
	    install -m 0644 packaging/swtpm-keeper.conf $(DESTDIR)$(CONFDIR)/swtpm-keeper.conf
	install -m 0755 packaging/reload-libvirt $(DESTDIR)$(PKGLIBEXEC)/reload-libvirt
	install -m 0755 hooks/qemu-chain $(DESTDIR)$(PKGLIBEXEC)/qemu-chain
	install -D -m 0644 docs/swtpm-keeper.8 $(DESTDIR)$(MANDIR)/man8/swtpm-keeper.8
	install -D -m 0644 docs/swtpm-keeper.conf.5 $(DESTDIR)$(MANDIR)/man5/swtpm-keeper.conf.5
	install -D -m 0644 docs/monitoring.md $(DESTDIR)$(DOCDIR)/monitoring.md
	install -D -m 0644 packaging/prometheus/swtpm-keeper.rules.yml \
	    $(DESTDIR)$(DOCDIR)/examples/swtpm-keeper.rules.yml
	install -D -m 0644 docs/backup.md $(DESTDIR)$(DOCDIR)/backup.md
	install -D -m 0755 packaging/examples/swtpm-keeper-virtnbdbackup \
	    $(DESTDIR)$(DOCDIR)/examples/swtpm-keeper-virtnbdbackup
	install -d -m 0700 $(DESTDIR)$(STOREDIR)
	install -d -m 0755 $(DESTDIR)$(UNITDIR)
	sed 's|/usr/sbin/swtpm-keeper|$(SBINDIR)/swtpm-keeper|' packaging/systemd/swtpm-keeper-capture.service \
	    > $(DESTDIR)$(UNITDIR)/swtpm-keeper-capture.service
	install -m 0644 packaging/systemd/swtpm-keeper-capture.timer $(DESTDIR)$(UNITDIR)/
	chmod 0644 $(DESTDIR)$(UNITDIR)/swtpm-keeper-capture.service
	@if [ -z "$(DESTDIR)" ]; then packaging/reload-libvirt; fi
	@# Where systemd runs, the capture timer starts now (a package does the same).
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
	    systemctl daemon-reload && systemctl enable --now swtpm-keeper-capture.timer; \
	elif [ -z "$(DESTDIR)" ]; then \
	    echo "systemd does not run here: capture running VMs from cron, see swtpm-keeper(8), CAPTURE"; fi

uninstall:
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
	    systemctl disable --now swtpm-keeper-capture.timer 2>/dev/null || true; fi
	rm -f $(DESTDIR)$(UNITDIR)/swtpm-keeper-capture.service $(DESTDIR)$(UNITDIR)/swtpm-keeper-capture.timer
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	rm -f $(DESTDIR)$(HOOKDIR)/$(HOOKNAME) $(DESTDIR)$(SBINDIR)/swtpm-keeper
	rm -f $(DESTDIR)$(PKGLIBEXEC)/swtpm-keeper $(DESTDIR)$(PKGLIBEXEC)/reload-libvirt \
	    $(DESTDIR)$(PKGLIBEXEC)/qemu-chain
	rm -f $(DESTDIR)$(MANDIR)/man8/swtpm-keeper.8 $(DESTDIR)$(MANDIR)/man5/swtpm-keeper.conf.5
	rm -f $(DESTDIR)$(DOCDIR)/monitoring.md $(DESTDIR)$(DOCDIR)/examples/swtpm-keeper.rules.yml
	rm -f $(DESTDIR)$(DOCDIR)/backup.md $(DESTDIR)$(DOCDIR)/examples/swtpm-keeper-virtnbdbackup
	-rmdir $(DESTDIR)$(DOCDIR)/examples $(DESTDIR)$(DOCDIR) 2>/dev/null
	-rmdir $(DESTDIR)$(PKGLIBEXEC) 2>/dev/null
	# Remove the configuration only if it is still the shipped one.
	if cmp -s packaging/swtpm-keeper.conf $(DESTDIR)$(CONFDIR)/swtpm-keeper.conf; then \
	    rm -f $(DESTDIR)$(CONFDIR)/swtpm-keeper.conf; rmdir $(DESTDIR)$(CONFDIR) 2>/dev/null || true; fi
	@echo "The store $(STOREDIR) (the captured TPM states) is left in place."
	@case "$$(readlink $(DESTDIR)$(MAINHOOK) 2>/dev/null)" in */swtpm-keeper/qemu-chain) \
	    echo "$(MAINHOOK) still links to the removed qemu-chain: mv $(MAINHOOK).orig $(MAINHOOK)" >&2;; esac
	@if [ -z "$(DESTDIR)" ]; then packaging/reload-libvirt; fi

test:
	$(CARGO) test $(CARGOFLAGS)

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy $(CARGOFLAGS) --all-targets -- -D warnings

check:
	tests/run-all

# Mutation testing of the modules that decide what is kept and what is
# restored. Each mutant is built and tested alone: hours on 2 cores, so not
# part of `check` (figures in docs/reliability.md). Narrow it with e.g.
# `make mutants MUTANTS_FILES=src/swtpm.rs MUTANTS_TEST_ARGS="--lib --test cli"`.
MUTANTS_FILES ?= src/store.rs src/putback.rs src/manifest.rs src/swtpm.rs \
                 src/lock.rs src/fsutil.rs src/capture.rs src/archive.rs \
                 src/failure.rs src/coverage.rs src/commands/metrics.rs
MUTANTS_JOBS  ?= 1
MUTANTS_TEST_ARGS ?=
mutants:
	command -v cargo-mutants >/dev/null || $(CARGO) install --locked cargo-mutants
	$(CARGO) mutants -j $(MUTANTS_JOBS) $(addprefix --file ,$(MUTANTS_FILES)) \
	    $(if $(MUTANTS_TEST_ARGS),-- $(MUTANTS_TEST_ARGS))

# The release tarball distributions build from: what git tracks at HEAD,
# the crates in vendor/ and the .cargo/config.toml that uses them (builds
# with --offline). Reproducible: the same commit gives the same sha256.
dist:
	CARGO=$(CARGO) packaging/dist.sh build/swtpm-keeper-$(VERSION).tar.gz

# A .deb for Debian 12 and later, from packaging/debian, built offline from
# the dist tarball. With the cargo on PATH (e.g. rustup's): -d skips the
# Build-Depends check, which tests/distro-build.sh makes in a clean Debian
# chroot with Debian's own Rust. The compiled crates are shared with this
# tree's target/.
deb: dist
	rm -rf build/deb && mkdir -p build/deb
	cp build/swtpm-keeper-$(VERSION).tar.gz build/deb/swtpm-keeper_$(VERSION).orig.tar.gz
	tar -xzf build/swtpm-keeper-$(VERSION).tar.gz -C build/deb
	cp -a packaging/debian build/deb/swtpm-keeper-$(VERSION)/debian
	cd build/deb/swtpm-keeper-$(VERSION) && \
	    CARGO_TARGET_DIR=$(abspath $(CARGO_TARGET_DIR)) dpkg-buildpackage -b -d -us -uc
	@ls build/deb/*.deb

# The .deb as Debian builds it: a clean Debian 12 chroot with Debian's
# rustc-web/cargo-web 1.85, no network; the .deb lands in build/distro/.
distro-deb:
	tests/distro-build.sh

# An .rpm from packaging/rpm/swtpm-keeper.spec (rpmbuild; Fedora/RHEL),
# offline from the dist tarball. --nodeps: here cargo is rustup's, not an
# rpm (the spec's BuildRequires name Fedora's and RHEL's cargo and rust).
rpm: dist
	rm -rf build/rpm && mkdir -p build/rpm/SOURCES
	cp build/swtpm-keeper-$(VERSION).tar.gz build/rpm/SOURCES/
	CARGO_TARGET_DIR=$(abspath $(CARGO_TARGET_DIR)) rpmbuild -bb --nodeps \
	    --define "_topdir $(abspath build/rpm)" packaging/rpm/swtpm-keeper.spec
	@find build/rpm/RPMS -name '*.rpm'

clean:
	$(CARGO) clean
	rm -rf build
