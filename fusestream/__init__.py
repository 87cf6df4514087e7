"""fusestream: run from a chained disk image through FUSE while its backing data streams in."""

__version__ = "0.1.0"
