"""The Open Inference Protocol v2 over gRPC: ``oip_v2.proto`` and its generated, committed message module."""
