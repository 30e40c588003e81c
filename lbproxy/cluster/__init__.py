"""What lbproxy instances share through Redis: admission limits, cluster-wide counts."""
