"""Running models under a backend SPEC (see :mod:`parity.backends.spec`)."""
