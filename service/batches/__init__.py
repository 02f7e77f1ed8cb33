"""The Batch API (docs/batch.md): OpenAI's /v1/files and /v1/batches for /v1/embeddings requests, run at batch
priority in the capacity online traffic leaves, with files and progress in a directory or an S3 bucket."""
