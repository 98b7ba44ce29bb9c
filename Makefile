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

BIN      = target/release/swtpm-keeper
PKGLIBEXEC = $(LIBEXECDIR)/swtpm-keeper
HOOKDIR  = $(SYSCONFDIR)/libvirt/hooks/qemu.d
CONFDIR  = $(SYSCONFDIR)/swtpm-keeper
STOREDIR = $(LOCALSTATEDIR)/lib/swtpm-keeper

.PHONY: all build install uninstall check clean

all: build

build:
	$(CARGO) build --release $(CARGOFLAGS)

$(BIN):
	$(CARGO) build --release $(CARGOFLAGS)

install: $(BIN)
	install -D -m 0755 $(BIN) $(DESTDIR)$(PKGLIBEXEC)/swtpm-keeper
	install -d -m 0755 $(DESTDIR)$(SBINDIR) $(DESTDIR)$(HOOKDIR) $(DESTDIR)$(CONFDIR)
	ln -sfn $(PKGLIBEXEC)/swtpm-keeper $(DESTDIR)$(SBINDIR)/swtpm-keeper
	ln -sfn $(PKGLIBEXEC)/swtpm-keeper $(DESTDIR)$(HOOKDIR)/$(HOOKNAME)
	# An operator's configuration is never overwritten.
	[ -e $(DESTDIR)$(CONFDIR)/swtpm-keeper.conf ] || \
	    install -m 0644 packaging/swtpm-keeper.conf $(DESTDIR)$(CONFDIR)/swtpm-keeper.conf
	install -D -m 0644 docs/swtpm-keeper.8 $(DESTDIR)$(MANDIR)/man8/swtpm-keeper.8
	install -D -m 0644 docs/swtpm-keeper.conf.5 $(DESTDIR)$(MANDIR)/man5/swtpm-keeper.conf.5
	install -d -m 0700 $(DESTDIR)$(STOREDIR)
	@if [ -z "$(DESTDIR)" ]; then packaging/reload-libvirt; fi

uninstall:
	rm -f $(DESTDIR)$(HOOKDIR)/$(HOOKNAME) $(DESTDIR)$(SBINDIR)/swtpm-keeper
	rm -f $(DESTDIR)$(PKGLIBEXEC)/swtpm-keeper
	rm -f $(DESTDIR)$(MANDIR)/man8/swtpm-keeper.8 $(DESTDIR)$(MANDIR)/man5/swtpm-keeper.conf.5
	-rmdir $(DESTDIR)$(PKGLIBEXEC) 2>/dev/null
	# Remove the configuration only if it is still the shipped one.
	if cmp -s packaging/swtpm-keeper.conf $(DESTDIR)$(CONFDIR)/swtpm-keeper.conf; then \
	    rm -f $(DESTDIR)$(CONFDIR)/swtpm-keeper.conf; rmdir $(DESTDIR)$(CONFDIR) 2>/dev/null || true; fi
	@echo "The store $(STOREDIR) (the captured TPM states) is left in place."
	@if [ -z "$(DESTDIR)" ]; then packaging/reload-libvirt; fi

check:
	tests/run-all

clean:
	$(CARGO) clean
