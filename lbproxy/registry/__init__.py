"""Redis discovery: registrations, the watcher and the rules that apply snapshots."""
