"""maskserve's data service: tokenized text in Redis, masked MLM batches over HTTP."""

__version__ = "0.1.0"
