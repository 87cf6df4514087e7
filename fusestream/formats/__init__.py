"""On-disk formats: one module each, the construct structs apart from the I/O logic."""
