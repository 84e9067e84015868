"""The data stage: annotator export -> checked dataset -> label map -> sharded TFRecords."""
