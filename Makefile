# swtpm-keeper: build, install, test.
#   make                      build the release binary (cargo)
#   make install              install (as root); DESTDIR, PREFIX, ... below
#   make uninstall            remove what install put in place; the store stays
#   make check                every test, hermetic and against a real libvirtd
#                             (as root on Debian 12; installs what it needs)
# Packagers: `make && make install DESTDIR=$pkgdir PREFIX=/usr` (see
# docs/packaging.md). With DESTDIR set, install never touches the running
# system (no daemon reload).

PREFIX        ?= /usr
SBINDIR       ?= $(PREFIX)/sbin
LIBEXECDIR    ?= $(PREFIX)/libexec
MANDIR        ?= $(PREFIX)/share/man
SYSCONFDIR    ?= /etc
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

.PHONY: all build install uninstall check clean deb distro-deb rpm dist

all: build

build:
	$(CARGO) build --release $(CARGOFLAGS)

$(BIN):
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
	install -d -m 0700 $(DESTDIR)$(STOREDIR)
	@if [ -z "$(DESTDIR)" ]; then packaging/reload-libvirt; fi

uninstall:
	rm -f $(DESTDIR)$(HOOKDIR)/$(HOOKNAME) $(DESTDIR)$(SBINDIR)/swtpm-keeper
	rm -f $(DESTDIR)$(PKGLIBEXEC)/swtpm-keeper $(DESTDIR)$(PKGLIBEXEC)/reload-libvirt \
	    $(DESTDIR)$(PKGLIBEXEC)/qemu-chain
	rm -f $(DESTDIR)$(MANDIR)/man8/swtpm-keeper.8 $(DESTDIR)$(MANDIR)/man5/swtpm-keeper.conf.5
	-rmdir $(DESTDIR)$(PKGLIBEXEC) 2>/dev/null
	# Remove the configuration only if it is still the shipped one.
	if cmp -s packaging/swtpm-keeper.conf $(DESTDIR)$(CONFDIR)/swtpm-keeper.conf; then \
	    rm -f $(DESTDIR)$(CONFDIR)/swtpm-keeper.conf; rmdir $(DESTDIR)$(CONFDIR) 2>/dev/null || true; fi
	@echo "The store $(STOREDIR) (the captured TPM states) is left in place."
	@case "$$(readlink $(DESTDIR)$(MAINHOOK) 2>/dev/null)" in */swtpm-keeper/qemu-chain) \
	    echo "$(MAINHOOK) still links to the removed qemu-chain: mv $(MAINHOOK).orig $(MAINHOOK)" >&2;; esac
	@if [ -z "$(DESTDIR)" ]; then packaging/reload-libvirt; fi

check:
	tests/run-all

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
