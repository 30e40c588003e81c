"""The proxy: listeners, per-connection sessions and the byte tunnel."""
