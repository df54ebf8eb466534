"""Ray pipelines: data (Ray Data), train (Ray Train), serve (Ray Serve), reports, dag, cli; storage (local
paths and URIs)."""
