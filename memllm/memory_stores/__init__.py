"""memory_stores subpackage."""
