"""Size / quality reports: what each table format costs in bytes and in click-model quality."""
