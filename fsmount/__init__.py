"""The user-facing front: the pyfuse3 mount and the `filestore` CLI. Thin: no business rules."""
