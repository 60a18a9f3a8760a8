"""Dataset curation where the pixels are: scores computed on the worker from the decoded image
(CLIP, aesthetic, NSFW), a keep rule that redraws failing images, CLIP image embeddings, and
near-duplicate search over a finished output."""
