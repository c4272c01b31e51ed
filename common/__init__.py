"""Code both the proxy and the providers (and the GPU worker) use, importing none
of them: `media` (fetch, sniff, validate and encode images; the outbound URL
guard; bounded downloads) and `logging` (structlog set-up with secret redaction).
"""
