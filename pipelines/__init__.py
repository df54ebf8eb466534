"""Ray pipelines: data (Ray Data), train (Ray Train), serve (Ray Serve), dag, cli."""
