"""Operating it: app lifecycle, supervisor and workers, health, drain, admin API, metrics."""
