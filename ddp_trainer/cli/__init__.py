"""The command-line tools: ddp-train and its commands, ddp-launch, the doctor and the shard writer."""
