"""The on-disk artifact: a directory of JSON + safetensors, written atomically, loaded with checks.

Modules, one job each: `schema` (layout constants, the manifest's entries, the encoded-table
type), `safetensors_io` (headers laid out and checked by hand), `writer` (table files filled in
row ranges, atomic publish) and `reader` (loading with every check). The format is documented
in docs/artifact.md.
"""
