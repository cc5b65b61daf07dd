"""Several machines serving one model: workers (ggml-rpc behind mutual TLS), pairing, plans, tunnels."""
