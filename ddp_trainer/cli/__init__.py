"""The command-line tools: ddp-train and its commands, ddp-launch, the doctor, the shard writer and the batch relay."""
