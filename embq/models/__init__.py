"""The models embq works on: TorchRec's DLRM (config, build, save / load without pickle),
training, click metrics, and reading tables out of TorchRec modules."""
