"""Shards to batches: windows of whole sentences, pure-function masking, resumable loaders."""
