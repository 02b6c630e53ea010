"""The dense pipeline: mergekit-style recipes planned tensor by tensor and streamed into sharded checkpoints."""
