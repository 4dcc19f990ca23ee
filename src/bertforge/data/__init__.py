"""Data stages: Wikipedia dump -> text -> sentences -> pre-training instances in TFRecord shards."""
