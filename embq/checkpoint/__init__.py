"""Reading sharded torch.distributed.checkpoint (DCP) directories in bounded memory, and
quantizing the DLRM they hold into one artifact (on one process or under torchrun)."""
