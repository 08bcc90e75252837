"""Filestore core: rules, transactions and events. Never imports pyfuse3."""
