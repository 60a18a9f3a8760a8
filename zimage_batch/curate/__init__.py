"""Dataset curation where the pixels are: scores computed on the worker from the decoded image
(CLIP, aesthetic, NSFW), a keep rule that redraws failing images, CLIP image embeddings. What
reads a finished OUTPUT (the near-duplicate search, the curation part of the report and the
dataset card) is in `output/` (`dedup.py`, `curation.py`)."""
