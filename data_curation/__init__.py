"""Data curation in the manner of DINOv2's LVD-142M: embed, deduplicate, cluster hierarchically, sample in a
balanced way, retrieve; on faiss, streaming embeddings from float16 shards so memory is bounded by shards."""
