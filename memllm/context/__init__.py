"""context subpackage."""
