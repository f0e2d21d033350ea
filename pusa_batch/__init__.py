"""Batch generation on Ray Data: a manifest of requests in, a video and thumbnail per row and output and
error manifests out, resumable (`pusa batch`). The stages are the service's own: the same request
parsing, conditioning encode, DiT step and decode code, so a row's video is the one the HTTP API makes.
"""
