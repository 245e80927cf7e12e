"""Embedding tables: formats and their configs, row-wise quantization and its range searches (with
their compiled kernels), codebooks, product quantization, and streaming over table files.

Modules: `configs` (typed format configs, the names they parse from), `registry` (name ->
format), `formats` (the format classes: bytes, encode, decode), `rowwise` + `greedy` +
`opt_search` + `kernels_*` (row-wise quantization), `codebook`, `pq`, `encode` (a model's tables
in memory), `sources` + `stream` (tables larger than RAM), and helpers (`fp16`, `packing`,
`parallel`, `compiled`).
"""
