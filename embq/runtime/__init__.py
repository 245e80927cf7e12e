"""Artifact -> inference modules: the production kernels, a range check before them, the DLRM.

`load.load_inference_model(path)` turns an artifact written by `embq quantize` into an eager
module, `forward(dense float32 [B, n_dense], sparse KeyedJaggedTensor) -> logits float32 [B]`:

- row-wise tables (fp32, fp16, int8, int4, int2 and their searches) go into fbgemm's
  `IntNBitTableBatchedEmbeddingBagsCodegen` (`tbe`), their bytes copied from the artifact's
  memory-mapped rows as they are (the TBE keeps qparams first): nothing is re-quantized and the
  tables stay compressed in memory. By default (kernel "auto") a row of at most 64 bytes is
  padded to the next power of two, so that no row straddles two cache lines: with uniform ids
  over large tables a straddling row costs a second memory access, which is most of a lookup
  (`scripts/bench_serving.py --quick`: int4 rows of dim 64, 36 bytes, look up ~1.7x faster
  padded to 64 bytes than unpadded, fbgemm's CPU default);
- kernel "compact" keeps the memory footprint at the artifact's size instead: 4-bit and 2-bit
  tables are looked up by ATen's `quantized::embedding_bag_{4,2}bit_rowwise_offsets` (`nbit`),
  which reads the artifact's fused rows in place (memory-mapped, shared between processes
  serving the same file); "tbe" puts every row-wise table in the TBE unpadded;
- codebook / PQ tables go to `codebook_bag` (their codes stay memory-mapped);
- the dense towers come from dense.safetensors, built by the loader of the dense section's
  meta "kind" (`dense_towers`).

Modules, one job each: `kernel_choice` (the choices, row padding and memory per table;
torch-free), `validate` (the one input check every entry point runs), `scripted`, `tbe`, `nbit`, `codebook_bag`, `quant_ebc`
(TorchRec's quant EBC), `bags` (every table behind one module), `dlrm` (the model), `dense_towers`,
`load`, `export` (TorchScript).

`export.export_torchscript(artifact, out)` saves the model's scriptable core (`DLRMCore`) with
`torch.jit.save`. Loading it needs only `torch` and `fbgemm_gpu` imported::

    import torch, fbgemm_gpu  # fbgemm_gpu registers the kernels the module calls
    m = torch.jit.load("model.pt")
    logits = m(dense, values, offsets)  # float32 [B]

    dense:   float32 [B, n_dense]
    values:  int64 [N]          ids of every sparse feature, key-major in the model's feature
                                order (all B bags of feature 0, then feature 1, ...);
                                exactly a KeyedJaggedTensor's values()
    offsets: int64 [F * B + 1]  bag boundaries into values (offsets[0] == 0, non-decreasing,
                                offsets[-1] == N); a KJT's offsets()

The module checks its input before any kernel reads it (`validate`): malformed offsets, ids
outside their tables, or dense values that are not finite raise a torch.jit.Error whose message
ends with "embq.errors.DataError: ..." naming what is wrong.

The feature order, table sizes and formats are in the file's extra file "embq_metadata.json"
(`torch.jit.load(path, _extra_files={"embq_metadata.json": ""})`) and in `inference_metadata`.
A scripted module cannot read torch's thread count: its lookups run on one thread unless told
otherwise, e.g. `for g in m.embeddings.groups.children(): if hasattr(g.kernel, "threads"):
g.kernel.threads = 2` (eager models follow torch.get_num_threads()). TBE tables are split into
one TBE per torch thread when the model is loaded (`tbe.CheckedTBE`): export under the thread
count the server will use.
"""
