"""Batch pipelines whose stages record their completion and are skipped when complete
(`stages`), and the Criteo pipeline built on them (`criteo`)."""
